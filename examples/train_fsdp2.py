"""Pretrain the example LLaMA-style model with SARA under PyTorch FSDP2 (``fully_shard``), checkpointed with
torch.distributed.checkpoint. ``examples/train.py --engine fsdp2`` runs this job.

    torchrun --nproc_per_node 2 examples/train.py --engine fsdp2 --steps 300
    torchrun --nproc_per_node 3 examples/train.py --engine fsdp2 --steps 600 --save_dir ckpt --resume  # another size
    torchrun --nproc_per_node 4 examples/train.py --engine fsdp2 --tp 2 --steps 300   # FSDP x TP on a 2 x 2 mesh

Each transformer block and then the root are ``fully_shard``-ed; with ``--tp N``, each block is first split over
the "tp" dim of a (world/N, N) mesh (``parallelize_module``: q, k, v, gate, up column-wise; o, down row-wise; the
head vocab-parallel) and ``fully_shard``-ed over "dp". The optimizer takes the DTensor parameters as they are
(``sara_ds.integrations.fsdp2``: elementwise state sharded like the parameter, each projected matrix stepped whole
on one owner rank, with the TP spectra where TP split it). Checkpoints are ``get_state_dict`` + ``dcp.save`` and
load at any world size and TP size; the global batch stays ``--global_batch`` sequences, split over the
data-parallel ranks, so a resumed run sees the data a straight one would. CPU (gloo) or GPU (NCCL); ranks from
torchrun, srun or mpirun (``sara_ds.env``).
"""
import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "harness")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from sara_bench import corpus, llama  # noqa: E402

import sara_ds  # noqa: E402
from sara_ds import env  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["fsdp2"], default="fsdp2", help="(examples/train.py's engine choice)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size: a (world/tp, tp) FSDP x TP mesh")
    ap.add_argument("--global_batch", type=int, default=12, help="sequences per step, split over the ranks")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--preset", default="sara", choices=sorted(sara_ds.PRESETS))
    ap.add_argument("--rank", type=int, default=32, help="SARA's rank r (projected matrices: attention and MLP)")
    ap.add_argument("--update_proj_gap", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval_interval", type=int, default=100)
    ap.add_argument("--eval_batches", type=int, default=4)
    ap.add_argument("--save_dir", default=None, help="write DCP checkpoints here (step<N>/, and 'latest')")
    ap.add_argument("--save_interval", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save_dir")
    ap.add_argument("--summary_json", default=None, help="write the final summary (and final weights' checksum) here")
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--port", type=int, default=None, help="MASTER_PORT when the launcher does not set one")
    return ap.parse_args(argv)


def shard(model, world: int, tp: int, device):
    """fully_shard each block and the root; with tp > 1, tensor-parallel first on a (world/tp, tp) mesh. Returns
    this rank's data-parallel index and size (TP peers train on the same micro-batch)."""
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the world size {world}")
    mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        if model.cfg.heads % tp or model.cfg.hidden % tp or model.cfg.intermediate % tp:
            raise SystemExit(f"--tp {tp} must divide --heads {model.cfg.heads}, --hidden {model.cfg.hidden} and "
                             f"the MLP width {model.cfg.intermediate}")
        grid = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        llama.parallelize(model, grid["tp"])
        mesh = grid["dp"]
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return (mesh.get_local_rank(), mesh.size()) if mesh is not None else (dist.get_rank(), world)


def save(model, optimizer, save_dir, step):
    """A DCP checkpoint of the model and the optimizer; ``latest`` names it once every rank has written it."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "step": step},
             checkpoint_id=os.path.join(save_dir, f"step{step}"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, "latest.tmp"), "w") as f:
            f.write(f"step{step}")
        os.replace(os.path.join(save_dir, "latest.tmp"), os.path.join(save_dir, "latest"))


def load(model, optimizer, save_dir) -> int:
    """The latest checkpoint, resharded to this world size: get_state_dict's template, dcp.load, set_state_dict."""
    tag = open(os.path.join(save_dir, "latest")).read().strip()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "step": 0}
    dcp.load(state, checkpoint_id=os.path.join(save_dir, tag))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    return int(state["step"])


def main(argv=None):
    args = parse_args(argv)
    source = env.discover(default_port=args.port)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    cfg = llama.LlamaConfig(vocab_size=corpus.VOCAB_SIZE, hidden=args.hidden, layers=args.layers, heads=args.heads,
                            intermediate=llama.swiglu_width(args.hidden), max_seq=args.seq_len)
    model = llama.Llama(cfg).to(device)
    dp_rank, dp = shard(model, world, args.tp, device)
    groups = sara_ds.param_groups(model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=0.25)
    optimizer = sara_ds.SaraAdamW(groups, lr=args.lr, preset=args.preset)

    data = corpus.Batches(corpus.token_ids("train"), args.seq_len, args.global_batch, seed=args.seed)
    val = list(corpus.validation_batches(args.seq_len, args.global_batch // dp, args.eval_batches * dp))[dp_rank::dp]
    start = load(model, optimizer, args.save_dir) if args.resume and args.save_dir and os.path.exists(
        os.path.join(args.save_dir, "latest")) else 0
    if rank == 0:
        print(f"[sara_ds] FSDP2 launcher={source} world={world} (TP={args.tp} x DP={dp}) device={device} "
              f"optimizer=SaraAdamW/{args.preset} "
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M global_batch={args.global_batch}x"
              f"{args.seq_len} steps={start}->{args.steps}", flush=True)

    def evaluate():
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for x, y in val:
                total += torch.tensor([model(x.to(device), y.to(device)).item() * y.numel(), y.numel()],
                                      dtype=torch.float64, device=device)
        dist.all_reduce(total)  # TP peers count their shared batches once each: the mean is unchanged
        model.reshard()  # the root stays unsharded after a forward with no backward: shard it again
        return math.exp(total[0].item() / total[1].item())

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stdout)
    history, loss_value, t0 = [], float("nan"), time.time()
    if start == 0:  # the untrained model: the baseline that training must beat (uniform over 4096 tokens: 4096)
        history.append((0, evaluate()))
        if rank == 0:
            msg = f"[sara_ds] step 0/{args.steps} (untrained) val_ppl {history[-1][1]:.2f}"
            (progress.write(msg) if progress else print(msg, flush=True))
    for step in range(start, args.steps):
        x, y = data.get(step, dp_rank, dp)
        loss = model(x.to(device), y.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value, done = loss.item(), step + 1
        if progress:
            progress.set_postfix(loss=f"{loss_value:.3f}")
            progress.update(1)
        if done % args.eval_interval == 0 or done == args.steps:
            history.append((done, evaluate()))
            if rank == 0:
                msg = f"[sara_ds] step {done}/{args.steps} loss {loss_value:.4f} val_ppl {history[-1][1]:.2f}"
                (progress.write(msg) if progress else print(msg, flush=True))
        if args.save_dir and ((args.save_interval and done % args.save_interval == 0) or done == args.steps):
            save(model, optimizer, args.save_dir, done)
    if progress:
        progress.close()
    elapsed = time.time() - t0
    # full_tensor of a TP weight under FSDP gathers one mesh dim after the other, and torch logs a warning
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    full = {n: p.full_tensor().detach().float().cpu() for n, p in model.named_parameters()}
    checksum = float(sum(t.double().sum() for t in full.values()))
    state_bytes = [None] * world
    dist.all_gather_object(state_bytes, optimizer.state_bytes())
    counts = [None] * world
    dist.all_gather_object(counts, optimizer.refresh_counts())
    overlaps = [None] * world
    dist.all_gather_object(overlaps, optimizer.subspace_overlaps())
    overlap = [v for part in overlaps for v in part.values() if not math.isnan(v)]
    refreshes = sum(c["refreshes"] for c in counts) // args.tp  # each matrix's owners on every TP rank refresh it
    if rank == 0:
        tokens = (args.steps - start) * args.global_batch * args.seq_len
        print("=" * 72)
        print(f"[sara_ds] summary: {args.steps - start} steps in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):.0f} "
              f"tok/s) on {world} rank(s) via {source}, FSDP2")
        print(f"[sara_ds]   final train loss {loss_value:.4f} | val ppl " + " ".join(f"{s}:{p:.2f}" for s, p in history))
        print(f"[sara_ds]   optimizer state per rank: {', '.join(f'{b / 1024:.1f} KiB' for b in state_bytes)} | "
              f"subspace refreshes {refreshes} | skipped steps {counts[0]['skipped_steps']} | mean overlap "
              f"{round(statistics.mean(overlap), 3) if overlap else None}")
        print(f"[sara_ds]   weights checksum {checksum:.10e}")
        print("=" * 72, flush=True)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump({"engine": "fsdp2", "steps": args.steps, "world": world, "tp": args.tp, "dp": dp,
                           "launcher": source, "final_loss": loss_value,
                           "val_ppl": history[-1][1] if history else None, "val_history": history,
                           "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "seconds": elapsed,
                           "optimizer_state_bytes_per_rank": state_bytes, "refreshes": refreshes,
                           "skipped_steps": counts[0]["skipped_steps"],
                           "mean_subspace_overlap": statistics.mean(overlap) if overlap else None,
                           "weights_checksum": checksum}, f, indent=1)
    dist.barrier()
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()
    # FSDP2's device meshes keep their gloo groups until interpreter exit, and tearing them down there can abort
    # a finished run ("terminate called without an active exception"): everything is written, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
