"""Pretrain the example LLaMA-style model on the bundled corpus with a SARA optimizer from a DeepSpeed config.

    deepspeed --num_gpus 2 examples/train.py --deepspeed_config configs/ds/sara.json
    torchrun --nproc_per_node 2 examples/train.py --engine fsdp2 --steps 300   # PyTorch FSDP2 instead

``--engine fsdp2`` runs ``examples/train_fsdp2.py``'s job (its own options: ``--engine fsdp2 --help``) with the
same progress, evaluation, summary and checkpoint behaviour, through torch.distributed.checkpoint.

Runs unchanged on CPU (gloo) and GPU (NCCL), under the deepspeed launcher,
torchrun, mpirun or srun (ranks are discovered by ``sara_ds.env``). Progress bar
and periodic validation perplexity on rank 0 (also at step 0: the untrained baseline); subspace
overlap is logged through DeepSpeed's monitor config (``tensorboard`` / ``csv_monitor``); checkpoints
with ``--save_dir`` and auto-resume from the latest one with ``--resume`` (``latest`` names a checkpoint
only once every rank has written it: ``sara_ds.integrations.deepspeed.save_checkpoint``); ``--resume
--load_universal`` resumes at another data-parallel size from a checkpoint converted by
``python -m sara_ds.ds_to_universal``.

dtype: ``--dtype auto`` (the default) keeps an explicit ``bf16.enabled`` true/false from the config;
where the config says ``"auto"`` (the shipped ones do) it trains in bf16 only where the device has native
bf16 (a CUDA GPU that supports it; a CPU with AMX-BF16 or AVX512-BF16), else fp32, and rank 0 says which
and why. ``--dtype bf16|fp32`` overrides both (``sara_bench.precision``).

The model, corpus and dtype rule come from the harness package ``sara_bench`` (``harness/``).
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "harness")]  # sara_ds and sara_bench, also from a bare checkout

import torch  # noqa: E402
from sara_bench import corpus, llama, precision  # noqa: E402

import sara_ds  # noqa: E402  (registers the optimizers with DeepSpeed)
from sara_ds import env  # noqa: E402
from sara_ds.integrations import deepspeed as sara_deepspeed  # noqa: E402


def engine_choice() -> str:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--engine", choices=["deepspeed", "fsdp2"], default="deepspeed")
    return ap.parse_known_args()[0].engine


def parse_args():
    import deepspeed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["deepspeed", "fsdp2"], default="deepspeed",
                    help="deepspeed (default): this config-driven job; fsdp2: examples/train_fsdp2.py's")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps (default: the scheduler's total_num_steps, else 300)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=precision.DTYPES, default="auto",
                    help="auto (default): the config's bf16.enabled if true/false, else bf16 only where the device "
                         "has native bf16 (else fp32); bf16 / fp32 override the config")
    ap.add_argument("--eval_interval", type=int, default=100)
    ap.add_argument("--eval_batches", type=int, default=8)
    ap.add_argument("--save_dir", default=None, help="write DeepSpeed checkpoints here")
    ap.add_argument("--save_interval", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save_dir")
    ap.add_argument("--load_universal", action="store_true",
                    help="with --resume: load the universal checkpoint named by --save_dir/latest_universal (written by "
                         "python -m sara_ds.ds_to_universal), at any data-parallel size; sets the config's "
                         "checkpoint.load_universal")
    ap.add_argument("--summary_json", default=None, help="write the final summary (and final weights' checksum) here")
    ap.add_argument("--dump_weights", default=None, help="rank 0 saves the final fp32 weights to this file")
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--port", type=int, default=None, help="MASTER_PORT when the launcher does not set one")
    deepspeed.add_config_arguments(ap)
    return ap.parse_args()


def main():
    # DeepSpeed's ZeRO calls a torch collective that torch 2.13 marks deprecated, once per step per rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)
    args = parse_args()
    source = env.discover(default_port=args.port)  # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from any launcher
    import deepspeed
    import torch.distributed as dist

    sara_deepspeed.prepare_cpu_launch()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))))
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()

    with open(args.deepspeed_config) as f:
        ds_config = json.load(f)
    from deepspeed.accelerator import get_accelerator

    # bf16.enabled "auto" -> a real bool (DeepSpeed reads "auto" as true in older releases, as false in 0.19.8)
    ds_config, _, dtype_msg = precision.resolve_config(ds_config, args.dtype, get_accelerator().device_name())
    if rank == 0:
        print(dtype_msg, flush=True)
    args.deepspeed_config = None  # DeepSpeed refuses a config file and a config dict together
    if args.load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    steps = args.steps or ds_config.get("scheduler", {}).get("params", {}).get("total_num_steps", 300)
    torch.manual_seed(args.seed)
    cfg = llama.LlamaConfig(vocab_size=corpus.VOCAB_SIZE, hidden=args.hidden, layers=args.layers, heads=args.heads,
                            intermediate=llama.swiglu_width(args.hidden), max_seq=args.seq_len)
    model = llama.Llama(cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters(),
                                                           config=ds_config)
    sara_opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    # Under tensor parallelism (AutoTP, or an mpu) the TP ranks of one data-parallel rank share its batch.
    mpu = getattr(engine, "mpu", None)
    dp_rank, dp = (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) if mpu else (rank, world)
    tp = world // dp
    global_batch = micro * gas * dp
    data = corpus.Batches(corpus.token_ids("train"), args.seq_len, micro * dp, seed=args.seed)
    val_batches = list(corpus.validation_batches(args.seq_len, micro, args.eval_batches * dp))[dp_rank::dp]
    device = engine.device

    start = 0
    latest = "latest_universal" if args.load_universal else "latest"
    if args.resume and args.save_dir and os.path.exists(os.path.join(args.save_dir, latest)):
        _, client = sara_deepspeed.load_checkpoint(engine, args.save_dir)
        start = int(client["step"])
    if rank == 0:
        print(f"[sara_ds] launcher={source} world={world} (TP={tp} x DP={dp}) device={device} "
              f"zero_stage={engine.zero_optimization_stage()} "
              f"dtype={'bf16' if engine.bfloat16_enabled() else 'fp16' if engine.fp16_enabled() else 'fp32'} "
              f"optimizer={type(sara_opt).__name__} params={sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters())/1e6:.2f}M "
              f"global_batch={global_batch}x{args.seq_len} steps={start}->{steps}", flush=True)

    def evaluate():
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # NCCL reduces only CUDA tensors
        with torch.no_grad():
            for x, y in val_batches:
                total += torch.tensor([engine(x.to(device), y.to(device)).item() * y.numel(), y.numel()],
                                      dtype=torch.float64, device=device)
        dist.all_reduce(total)
        engine.train()
        return math.exp(total[0].item() / total[1].item())

    def overlaps():
        gathered = [None] * world
        dist.all_gather_object(gathered, sara_opt.subspace_overlaps())
        merged = {}
        for part in gathered:
            merged.update(part)
        return {k: v for k, v in merged.items() if not math.isnan(v)}

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stdout)
    gap = next((g["update_proj_gap"] for g in sara_opt.param_groups if "rank" in g), None)
    history = []
    if start == 0:  # the untrained model: the baseline that training must beat (uniform over 4096 tokens: 4096)
        ppl = evaluate()
        history.append((0, ppl))
        if rank == 0:
            msg = f"[sara_ds] step 0/{steps} (untrained) val_ppl {ppl:.2f}"
            (progress.write(msg) if progress else print(msg, flush=True))
            if engine.monitor.enabled:
                engine.monitor.write_events([("Eval/val_ppl", ppl, 0)])
    t0, loss_value = time.time(), float("nan")
    # SARA_DS_FAULT=RANK:STEP makes that rank die at that step (for testing that a crash ends the job)
    fault = tuple(int(v) for v in os.environ["SARA_DS_FAULT"].split(":")) if os.environ.get("SARA_DS_FAULT") else None
    for step in range(start, steps):
        if fault and fault == (rank, step):
            print(f"[sara_ds] rank {rank}: injected fault at step {step}", flush=True)
            os._exit(3)
        for micro_step in range(gas):
            x, y = data.get(step * gas + micro_step, dp_rank, dp)
            loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            engine.step()
        loss_value = loss.item()
        done = step + 1
        if progress:
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{engine.get_lr()[0]:.2e}")
            progress.update(1)
        if gap and done % gap == 1 and done > gap:  # the step right after a refresh
            ov = overlaps()
            if rank == 0 and ov and engine.monitor.enabled:
                events = [(f"Train/subspace_overlap/{k}", v, done) for k, v in sorted(ov.items())]
                events.append(("Train/subspace_overlap/mean", statistics.mean(ov.values()), done))
                engine.monitor.write_events(events)
        if done % args.eval_interval == 0 or done == steps:
            ppl = evaluate()
            history.append((done, ppl))
            if rank == 0:
                msg = f"[sara_ds] step {done}/{steps} loss {loss_value:.4f} val_ppl {ppl:.2f}"
                (progress.write(msg) if progress else print(msg, flush=True))
                if engine.monitor.enabled:
                    engine.monitor.write_events([("Eval/val_ppl", ppl, done), ("Train/loss", loss_value, done)])
        if args.save_dir and ((args.save_interval and done % args.save_interval == 0) or done == steps):
            sara_deepspeed.save_checkpoint(engine, args.save_dir, f"step{done}", {"step": done})
    if progress:
        progress.close()

    elapsed = time.time() - t0
    state_bytes = [None] * world
    dist.all_gather_object(state_bytes, sara_opt.state_bytes())
    ov = overlaps()
    counts = [None] * world
    dist.all_gather_object(counts, sara_opt.refresh_counts())
    tp_bytes = [None] * world  # what each rank put into TP collectives at subspace refreshes
    dist.all_gather_object(tp_bytes, sara_opt.tp_bytes_sent())
    from deepspeed.utils import safe_get_full_fp32_param

    from sara_ds.sharding.tensor_parallel import split_axis_of_marked as partition_dim

    tp_group = sara_deepspeed.tensor_parallel_group(engine)
    full = {}
    for n, p in model.named_parameters():
        value = safe_get_full_fp32_param(p) if engine.zero_optimization() else p.detach().float()
        if tp_group is not None and partition_dim(p) is not None:  # a TP shard: gather the whole matrix
            parts = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(parts, value.contiguous(), group=tp_group)
            value = torch.cat(parts, dim=partition_dim(p))
        full[n] = value.detach().cpu().clone()
    global_loss = torch.tensor([loss_value], dtype=torch.float64, device=device)
    dist.all_reduce(global_loss)
    checksum = float(sum(t.double().sum() for t in full.values()))
    print(f"[sara_ds] rank {rank}/{world}: mean final loss {global_loss.item() / world:.6f} "
          f"weights checksum {checksum:.10e}", flush=True)
    if rank == 0:
        tokens = (steps - start) * global_batch * args.seq_len
        summary = {
            "steps": steps, "world": world, "launcher": source, "final_loss": loss_value,
            "val_ppl": history[-1][1] if history else None, "val_history": history,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "seconds": elapsed,
            "optimizer_state_bytes_per_rank": state_bytes,
            "mean_subspace_overlap": statistics.mean(ov.values()) if ov else None,
            "refreshes": sum(c["refreshes"] for c in counts), "skipped_steps": counts[0]["skipped_steps"],
            "tp": tp, "dp": dp, "tp_bytes_per_rank": tp_bytes,
            "weights_checksum": checksum,
        }
        print("=" * 72)
        print(f"[sara_ds] summary: {steps - start} steps in {elapsed:.1f}s "
              f"({summary['tokens_per_s']:.0f} tok/s) on {world} rank(s) via {source}")
        print(f"[sara_ds]   final train loss {loss_value:.4f} | val ppl "
              + " ".join(f"{s}:{p:.2f}" for s, p in history))
        print(f"[sara_ds]   optimizer state per rank: {', '.join(f'{b/1024:.1f} KiB' for b in state_bytes)} | "
              f"subspace refreshes {summary['refreshes']} | mean overlap "
              f"{summary['mean_subspace_overlap'] if summary['mean_subspace_overlap'] is None else round(summary['mean_subspace_overlap'], 3)}")
        if tp > 1:
            print(f"[sara_ds]   TP={tp} x DP={dp}: bytes put into TP collectives at refreshes, per rank: "
                  + ", ".join(f"{b / 1024:.1f} KiB" for b in tp_bytes))
        print("=" * 72, flush=True)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=1)
        if args.dump_weights:
            torch.save(full, args.dump_weights)
    dist.barrier()
    del engine, optimizer, sara_opt, model
    gc.collect()  # a gloo worker thread touching Python during interpreter exit aborts the process otherwise
    dist.destroy_process_group()


if __name__ == "__main__":
    if engine_choice() == "fsdp2":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import train_fsdp2

        train_fsdp2.main()
    else:
        main()
