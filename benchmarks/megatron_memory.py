"""Megatron-core: optimizer memory and communication per rank, SARA against Megatron's own Adam, in one run.

A megatron-core ``GPTModel`` (LLaMA-like: RMSNorm, SwiGLU, no biases, bf16) at TP x DP on
gloo/CPU. Each rank builds, side by side in the same processes:

  * SARA with the distributed optimizer (``use_distributed_optimizer=True``: whole matrices
    per DP rank, megatron-core's layer-wise wrapper), its gradients all-reduced;
  * on megatron-core >= 0.19 also SARA's distributed optimizer over a reduce-scattered, shard-aligned DDP
    buffer (``shard_aligned_layout``: "SARA + dist-opt RS");
  * Megatron's Adam with its distributed optimizer (the flat, reduce-scattered one);
  * SARA without the distributed optimizer (state and masters replicated over DP);
  * Megatron's Adam without it.

It takes a refresh step and two ordinary steps, then reports per rank the optimizer
state plus fp32 master bytes, and the bytes each rank put into each kind of collective
in one ordinary step (gradient reduction included), counted by a wrapper around
``torch.distributed`` (tests/counting_dist.py). Last, the analytic per-GPU table for
LLaMA-7B and 70B, whose formula is first checked against the bytes measured here.

    python benchmarks/megatron_memory.py --tp 2 --dp 2 --hidden 256 --layers 4

On a machine without CUDA, Megatron's CUDA-only calls are moved to the CPU by the shims
the test suite uses (tests/megatron_worker.py); with CUDA none are installed.
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
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from sara_ds.optim import tensors  # noqa: E402  (every tensor in nested dicts and lists)

CONFIGS = ("SARA + dist-opt", "Adam + dist-opt", "SARA", "Adam")
RS = "SARA + dist-opt RS"  # megatron-core >= 0.19 only


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def optimizer_memory(chained) -> dict:
    """Bytes of optimizer state and of fp32 master weights held by this rank."""
    state, masters = [], []
    for opt in chained.chained_optimizers:
        state += list(tensors(opt.optimizer.state))
        for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            masters += list(tensors(getattr(opt, attr, [])))
    return {"state": _bytes(state), "masters": _bytes(masters)}


def build_model(args, name: str):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(1234, inference_rng_tracker=not torch.cuda.is_available())
    cfg = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                            ffn_hidden_size=args.ffn, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                            use_cpu_initialization=True, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                            add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
                            bias_activation_fusion=False, masked_softmax_fusion=False, bf16=True,
                            params_dtype=torch.bfloat16, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                            bias_dropout_fusion=False)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=args.vocab, max_sequence_length=args.seq, position_embedding_type="rope")
    module = Float16Module(cfg, model)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=name in ("Adam + dist-opt", RS))
    if name == RS:
        from sara_ds.integrations.megatron_distributed import shard_aligned_layout

        return DistributedDataParallel(cfg, ddp_config, module, full_param_layout=shard_aligned_layout(module, ddp_config))
    return DistributedDataParallel(cfg, ddp_config, module)


def build_optimizer(args, name, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from sara_ds.integrations.megatron import get_sara_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, clip_grad=0.0, adam_eps=1e-8,
                             use_distributed_optimizer="dist-opt" in name)
    if name.startswith("SARA"):
        return get_sara_megatron_optimizer(config, [model], rank=args.rank, update_proj_gap=args.gap)
    return get_megatron_optimizer(config, [model])


def ring_bytes(op, ranks, given):
    """Bytes one rank sends for a collective over ``ranks`` ranks, by the ring algorithm, from the bytes it gives:
    an all-reduce sends 2(N-1)/N of its tensor, a reduce-scatter (N-1)/N of its input, an all-gather N-1 copies
    of its shard."""
    if op == "all_reduce":
        return 2 * (ranks - 1) * given // ranks
    if op == "reduce_scatter_tensor":
        return (ranks - 1) * given // ranks
    if op in ("all_gather_into_tensor", "all_gather"):
        return (ranks - 1) * given
    return given


def worker(args):
    import torch.distributed as dist

    import counting_dist

    # before megatron is imported: its gradient buffers bind torch.distributed's collectives at import time
    counter = counting_dist.install()
    counter.enabled = False
    warnings.simplefilter("ignore")
    if not torch.cuda.is_available():
        from megatron_worker import install_cpu_shims

        install_cpu_shims()
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    dp_ranks = tuple(dist.get_process_group_ranks(parallel_state.get_data_parallel_group()))
    tp_ranks = tuple(dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()))
    from sara_ds.integrations.megatron_distributed import supports_shard_aligned_buffers

    out = {}
    wanted = args.configs.split(",") if args.configs else CONFIGS
    for name in [n for n in CONFIGS if n in wanted] + ([RS] if supports_shard_aligned_buffers() else []):
        model = build_model(args, name)
        opt = build_optimizer(args, name, model)
        steps = {}
        for step in range(3):  # step 0 refreshes every subspace; steps 1 and 2 are ordinary
            g = torch.Generator().manual_seed(step)
            tokens = torch.randint(0, args.vocab, (2, args.seq + 1), generator=g)
            pos = torch.arange(args.seq).unsqueeze(0).expand(2, -1)
            opt.zero_grad()
            model.zero_grad_buffer()
            model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean().backward()
            counter.clear()
            counter.enabled = step == 2
            model.finish_grad_sync()
            ok, _, _ = opt.step()
            counter.enabled = False
            assert ok
            if step == 2:
                for (op, size, nbytes), ranks in zip(counter.records, counter.groups):
                    axis = "dp" if ranks == dp_ranks else "tp" if ranks == tp_ranks else "world"
                    steps[f"{op}@{axis}"] = steps.get(f"{op}@{axis}", 0) + ring_bytes(op, size, nbytes)
        buffers = [b for chunk in [model] for b in chunk.buffers]  # the gradient buffers DDP reduces
        out[name] = {"memory": optimizer_memory(opt), "comm": steps,
                     "grad_buffer_bytes": sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)}
        del model, opt
        gc.collect()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(gathered))
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the analytic model

def llama_matrices(h, ffn, layers, heads, kv_heads, vocab, tp):
    """(local shape, split axis) of every weight of a LLaMA at TP, as megatron-core shards it; axis None: not split."""
    head = h // heads
    per_layer = [((h + 2 * kv_heads * head) // tp, h, 0), (h, h // tp, 1), (2 * ffn // tp, h, 0), (h, ffn // tp, 1)]
    mats = [(m, n, axis, True) for _ in range(layers) for m, n, axis in per_layer]
    mats += [(vocab // tp, h, 0, False), (vocab // tp, h, 0, False)]  # embedding, untied output layer
    mats += [(h, 1, None, False)] * (2 * layers + 1)  # RMSNorm weights
    return mats


def sara_state_bytes(m, n, axis, r):
    """Adam on the r-dim projection: basis on the unsharded axis (or the smaller one), moments r x the other."""
    if axis == 0:
        basis_dim, other = n, m  # column-parallel: rows split, right basis (n x r)
    elif axis == 1:
        basis_dim, other = m, n
    else:
        basis_dim, other = min(m, n), max(m, n)
    r = min(r, basis_dim)
    return 4 * (basis_dim * r + 2 * r * other)


def per_gpu_bytes(mats, r, dp, method, distributed):
    """bf16 weights and grads (2 + 2 B), fp32 masters (4 B) and optimizer state, per GPU of one TP group.
    Distributed: masters and state divided by DP (whole matrices or flat shards; granularity aside)."""
    weights_grads = sum(4 * m * n for m, n, _, _ in mats)
    opt = 0
    for m, n, axis, projected in mats:
        opt += 4 * m * n + (sara_state_bytes(m, n, axis, r) if method == "SARA" and projected else 8 * m * n)
    return weights_grads + (opt / dp if distributed else opt), opt


def check_formula(args, measured) -> str:
    mats = llama_matrices(args.hidden, args.ffn, args.layers, args.hidden // 64, args.hidden // 64, args.vocab, args.tp)
    lines = []
    for name in (n for n in CONFIGS if n in measured):
        method = name.split()[0]
        _, opt = per_gpu_bytes(mats, args.rank, 1, method, False)
        # per TP rank, summed over its DP group; distributed runs hold each byte once, replicated ones DP times
        tp0 = [m for i, m in enumerate(measured[name]) if i % args.tp == 0]
        total = sum(x["state"] + x["masters"] for x in tp0)
        copies = 1 if name.endswith("dist-opt") else args.dp
        lines.append(f"  {name:<18} formula {opt * copies / 2**20:9.3f} MiB, measured {total / 2**20:9.3f} MiB, "
                     f"measured - formula = {total - opt * copies} B")
    return "\n".join(lines)


def analytic_table() -> str:
    models = {"LLaMA-7B": dict(h=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000, r=1024),
              "LLaMA-70B": dict(h=8192, ffn=28672, layers=80, heads=64, kv_heads=8, vocab=32000, r=2048)}
    lines = [f"{'model':<10} {'TP x DP':>8} {'Adam+DistOpt':>13} {'SARA+DistOpt':>13} {'SARA':>10} {'Adam':>10}  "
             f"SARA+DistOpt / Adam+DistOpt"]
    for label, cfg in models.items():
        r = cfg.pop("r")
        for dp in (8, 64):
            mats = llama_matrices(**cfg, tp=8)
            values = {name: per_gpu_bytes(mats, r, dp, name.split()[0], name.endswith("dist-opt"))[0] / 2**30
                      for name in CONFIGS}
            lines.append(f"{label:<10} {f'8 x {dp}':>8} {values['Adam + dist-opt']:>11.2f}Gi "
                         f"{values['SARA + dist-opt']:>11.2f}Gi {values['SARA']:>8.2f}Gi {values['Adam']:>8.2f}Gi  "
                         f"{values['SARA + dist-opt'] / values['Adam + dist-opt']:.3f}")
        losing = sorted({(m, n) for m, n, axis, projected in llama_matrices(**cfg, tp=8)
                         if projected and sara_state_bytes(m, n, axis, r) >= 8 * m * n})
        cfg["r"] = r
        if losing:
            lines.append(f"{'':<10} SARA's state is not smaller than Adam's for the local shards {losing}: "
                         f"at TP=8 their split axis is narrower than r = {r}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=None, help="SwiGLU width (default 8/3 hidden, rounded to 64)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rank", type=int, default=None, help="projection rank (default hidden/4)")
    ap.add_argument("--gap", type=int, default=200, help="subspace refresh interval T")
    ap.add_argument("--json", default=None, help="also write every rank's measurements to this file")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all; "
                    f"'{RS}' runs wherever megatron-core supports it)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rank = args.rank or args.hidden // 4
    args.ffn = args.ffn or (8 * args.hidden // 3 + 63) // 64 * 64
    if args.worker:
        return worker(args)
    world = args.tp * args.dp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *sys.argv[1:]], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a rank failed: {[p.returncode for p in procs]}\n{outs[0][1][-3000:]}")
    per_rank = json.loads(next(line for line in outs[0][0].splitlines() if line.startswith("RESULT "))[7:])
    configs = list(per_rank[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), per_rank=per_rank), f)
    measured = {name: [rank[name]["memory"] for rank in per_rank] for name in configs}

    print(f"megatron-core GPTModel, hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}, bf16; "
          f"SARA r={args.rank}; TP={args.tp} x DP={args.dp} (gloo), all measured in one run\n")
    print("Optimizer state + fp32 masters per rank (MiB):")
    print(f"{'':<20}" + "".join(f"{f'rank {r}':>10}" for r in range(world)) + f"{'max':>10}{'vs Adam+DistOpt':>17}")
    adam_max = max(m["state"] + m["masters"] for m in measured["Adam + dist-opt"])
    for name in configs:
        values = [m["state"] + m["masters"] for m in measured[name]]
        print(f"{name:<20}" + "".join(f"{v / 2**20:>10.3f}" for v in values) + f"{max(values) / 2**20:>10.3f}"
              f"{max(values) / adam_max:>16.3f}x")
    print("\nBytes rank 0 sends in one ordinary step (gradient reduction included), by collective and group, "
          "ring algorithm (KiB):")
    keys = sorted({k for name in configs for k in per_rank[0][name]["comm"]})
    print(f"{'':<20}" + "".join(f"{k:>26}" for k in keys) + f"{'total':>12}{'vs Adam+DistOpt':>17}")
    adam_total = sum(per_rank[0]["Adam + dist-opt"]["comm"].values())
    for name in configs:
        comm = per_rank[0][name]["comm"]
        print(f"{name:<20}" + "".join(f"{comm.get(k, 0) / 1024:>26.1f}" for k in keys)
              + f"{sum(comm.values()) / 1024:>12.1f}{sum(comm.values()) / adam_total:>16.3f}x")
    print("\nThe analytic formula against these bytes (per TP rank, summed over its DP group; the formula leaves "
          "out the 4-byte step counters torch keeps per tensor):")
    print(check_formula(args, measured))
    print("\nPer GPU, analytic (bf16 weights and grads, fp32 masters, optimizer state; r = hidden/4; TP=8):")
    print(analytic_table())


if __name__ == "__main__":
    main()
