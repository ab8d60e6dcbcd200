"""Optimizer-state bytes per rank under ZeRO-1/2/3: SARA vs DeepSpeed's own AdamW vs torch AdamW without ZeRO.

All measured in one run on the same model: N ranks (gloo, CPU) build a DeepSpeed engine
once with SaraAdamW and once with DeepSpeed's AdamW (``torch_adam``) under the same
stage, take one step, and report the inner optimizer's state bytes and the engine's fp32
master partition; the parent measures torch.optim.AdamW on one process with no ZeRO.

It then checks the per-GPU formula against those bytes, and prints it for LLaMA-7B at DP 8
and 64, ZeRO-2 against ZeRO-3, Adam against SARA (bf16 weights and gradients, fp32 masters):

    ZeRO-2:  2 P  + (2 P + 4 P + S) / N        ZeRO-3:  (2 P + 2 P + 4 P + S) / N

with P parameters and S the optimizer state's bytes on one process: 8 P for Adam, and for SARA
``state_formula_bytes`` (each matrix's basis and moments from its shape, the optimizer's own
``Matrix.state_numel``). SARA's ZeRO-3 ownership keeps whole matrices, so a rank's share is S / N
plus at most one matrix's state.

    python benchmarks/zero_memory.py --world 2 --stage 3 --hidden 512 --layers 8
"""
import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import warnings

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "harness")]  # sara_ds and the harness, also from a bare checkout
import sara_ds  # noqa: E402
from sara_bench import llama  # noqa: E402


def state_bytes(opt):
    def walk(v):
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        return 0
    return walk(opt.state if hasattr(opt, "state") else opt)


def build(args):
    torch.manual_seed(0)
    return llama.Llama(llama.LlamaConfig(vocab_size=4096, hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                                         intermediate=llama.swiglu_width(args.hidden), max_seq=32))


def state_formula_bytes(opt) -> int:
    """One process's optimizer state from the shapes alone: fp32, every parameter's basis and moments."""
    return 4 * sum(m.state_numel for m in opt.matrices)


def llama7b_table(rank: int = 1024) -> str:
    """Per-GPU GiB for LLaMA-7B (hidden 4096, 32 layers, SwiGLU 11008, vocab 32000), from the formula above."""
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig(vocab_size=32000, hidden=4096, layers=32, heads=32, intermediate=11008,
                                              max_seq=2048))
        sara = sara_ds.SaraAdamW(sara_ds.param_groups(model, rank=rank), lr=1e-3)
    p = sum(q.numel() for q in model.parameters())
    states = {"Adam": 8 * p, f"SARA r={rank}": state_formula_bytes(sara)}
    lines = [f"LLaMA-7B ({p / 1e9:.2f}B params), per GPU, GiB (bf16 weights and grads, fp32 masters; S/P = "
             + ", ".join(f"{k} {v / p:.2f} B" for k, v in states.items()) + "):",
             f"{'':<18}" + "".join(f"{f'DP={n} {z}':>16}" for n in (8, 64) for z in ("ZeRO-2", "ZeRO-3"))]
    for name, s in states.items():
        row = [(2 * p + (2 * p + 4 * p + s) / n) if z == 2 else (8 * p + s) / n for n in (8, 64) for z in (2, 3)]
        lines.append(f"{name:<18}" + "".join(f"{v / 2**30:>16.2f}" for v in row))
    return "\n".join(lines)


def worker(args):
    import deepspeed
    import torch.distributed as dist

    from sara_ds.integrations import deepspeed as sara_deepspeed

    warnings.simplefilter("ignore")
    sara_deepspeed.prepare_cpu_launch()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizers = {
        "SaraAdamW": {"type": "SaraAdamW", "params": {"lr": 1e-3, "rank": args.rank, "preset": "sara"}},
        "DeepSpeed AdamW": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    out = {}
    for name, opt_cfg in optimizers.items():
        model = build(args)
        cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": opt_cfg, "steps_per_print": 10**9,
               "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        x = torch.randint(0, 4096, (2, 33))
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()
        inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        masters = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        masters = masters if masters is not None else engine.optimizer.single_partition_of_fp32_groups
        mine = [state_bytes(inner), sum(t.numel() * t.element_size() for t in masters)]
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        out[name] = gathered
        del engine, inner
        gc.collect()
    if rank == 0:
        print(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=None, help="projection rank (default hidden/4)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rank = args.rank or args.hidden // 4
    if args.worker:
        return worker(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(args.world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a rank failed: {[p.returncode for p in procs]}")
    per_rank = json.loads(outs[0].strip().splitlines()[-1])

    model = build(args)
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adam.step()
    single_adam = state_bytes(adam)
    sara_single = sara_ds.SaraAdamW(sara_ds.param_groups(model, rank=args.rank), lr=1e-3)
    sara_single.step()
    single_sara = state_bytes(sara_single)
    formula = state_formula_bytes(sara_single)

    n = sum(p.numel() for p in model.parameters())
    print(f"model: LLaMA-style hidden={args.hidden} layers={args.layers} ({n/1e6:.2f}M params), rank r={args.rank}, "
          f"ZeRO-{args.stage} on {args.world} ranks (measured in one run)")
    print(f"{'optimizer state':<28}" + "".join(f"{f'rank {r}':>12}" for r in range(args.world)) + f"{'sum':>12}{'1 process':>12}")
    sara_state = [b for b, _ in per_rank["SaraAdamW"]]
    ds_state = [b for b, _ in per_rank["DeepSpeed AdamW"]]
    rows = [("SaraAdamW (ZeRO)", sara_state, single_sara),
            ("DeepSpeed AdamW (ZeRO)", ds_state, single_adam),
            ("torch AdamW (no ZeRO)", [single_adam] * args.world, single_adam)]
    for name, values, single in rows:
        print(f"{name:<28}" + "".join(f"{v/2**20:>10.2f}Mi" for v in values) + f"{sum(values)/2**20:>10.2f}Mi{single/2**20:>10.2f}Mi")
    masters = [m for _, m in per_rank["SaraAdamW"]]
    print(f"{'fp32 masters (engine)':<28}" + "".join(f"{v/2**20:>10.2f}Mi" for v in masters)
          + f"{sum(masters)/2**20:>10.2f}Mi{4 * n/2**20:>10.2f}Mi")
    sara_max, ds_max = max(sara_state), max(ds_state)
    print(f"ratios per rank (max over ranks): SARA / DeepSpeed AdamW = {sara_max/ds_max:.3f}; "
          f"SARA / torch AdamW without ZeRO = {sara_max/single_adam:.3f}; "
          f"SARA per rank / SARA on 1 process = {sara_max/single_sara:.3f} (ideal {1/args.world:.3f})")
    largest = max(state_bytes({"s": st}) for st in sara_single.state.values())
    print(f"formula check: S = {formula} B from the shapes, {single_sara} B measured on one process, {sum(sara_state)} B "
          f"summed over the ZeRO ranks; largest rank {sara_max} B <= S/N + one matrix = "
          f"{formula / args.world + largest:.0f} B: {sara_max <= formula / args.world + largest}")
    print()
    print(llama7b_table())


if __name__ == "__main__":
    main()
