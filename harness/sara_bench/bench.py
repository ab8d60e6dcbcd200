"""The evidence benchmark: every subspace rule and base, pretrained side by side on the bundled corpus.

    sara-bench                         # CPU default, ~1 h on 2 cores, writes bench_results/cpu/
    sara-bench --size smoke            # a 1-minute end-to-end check of the whole harness
    python -m sara_bench.code_corpus build && sara-bench --size gpu60m --device cuda --jobs 1   # the code corpus

Protocol (GaLore's, scaled to the run): cosine schedule with 10% warmup down to
10% of peak, alpha (scale) = 0.25, r = hidden/4, T = steps/40, gradient clipping
1.0, the same data order and initial weights for every method at a given seed.
AdamW is tuned over a small lr grid; the low-rank methods use GaLore's lr.

Each run is a single-threaded process (two run side by side on 2 cores: see
shared/notes/data.md, 2-thread OpenMP collapses under contention). A run
checkpoints every ``checkpoint_every`` steps and appends one JSON line to
``results.jsonl`` when it finishes, so an interrupted benchmark resumes: finished
runs are skipped, unfinished ones continue from their checkpoint, bit for bit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy
import torch

from .records import (CLOSURE_PAIRS, METHOD_BY_NAME, METHODS, Method, Size,  # noqa: F401 (re-exported)
                      append_result, load_results)

# glibc gives freed pages back to the hypervisor and faults them in again: 1.6x on the CI-class VM.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
              "MALLOC_TOP_PAD_": "1073741824"}


class RunInterrupted(RuntimeError):
    """A run stopped on request (--stop-after); its checkpoint is on disk."""


SIZES = {
    # end-to-end check of the harness (CI runs it): every method, one seed, tiny
    "smoke": Size(hidden=32, layers=1, heads=2, seq_len=32, batch=4, steps=24, eval_every=8, eval_batches=2,
                  adamw_lrs=(5e-3,), lowrank_lr=1e-2, seeds=(0,), checkpoint_every=4, final_eval_tokens=4096),
    # about an hour on 2 idle cores: 14 methods x 3 seeds + 2 extra AdamW lrs x 3 seeds = 48 runs of ~2.3 min
    # the end-of-run evaluation reads 2^20 validation tokens on the code corpus (and all of its 0.68M select ones);
    # the prose's validation text holds ~62k per split
    "cpu": Size(hidden=128, layers=4, heads=4, seq_len=128, batch=16, steps=500, eval_every=50, eval_batches=10,
                adamw_lrs=(2.5e-3, 5e-3, 1e-2), lowrank_lr=1e-2, final_eval_tokens=1 << 20),
    # LLaMA-60M (GaLore's smallest C4 model: its layer shapes and 32000-token vocabulary) on the code corpus
    # (python -m sara_bench.code_corpus build): 2500 x 64 x 256 = 41M tokens, 0.95 of an epoch of its 43.0M
    "gpu60m": Size(hidden=512, intermediate=1376, layers=8, heads=8, seq_len=256, batch=64, steps=2500,
                   eval_every=250, eval_batches=40, adamw_lrs=(1e-3, 2.5e-3, 5e-3), lowrank_lr=1e-2,
                   checkpoint_every=250, jobs=1, data="code"),
}


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"


def plan(size: Size, methods=None, seeds=None, lrs=None) -> list[RunSpec]:
    """Every (method, lr, seed) to run. ``lrs`` replaces the chosen methods' lrs (a sweep): a list for all of
    them, or a dict method -> lrs for some. A folder may hold several lrs of a method; the report picks each
    method's on the held-out select split."""
    chosen = [METHOD_BY_NAME[m] for m in methods] if methods else list(METHODS)
    seeds = tuple(seeds) if seeds is not None else size.seeds
    runs = []
    for seed in seeds:  # seed-major: a partial benchmark already has one comparable seed of everything
        for m in chosen:
            grid = size.adamw_lrs if m.name == "AdamW" else (size.lowrank_lr,)
            if isinstance(lrs, dict):
                grid = tuple(lrs.get(m.name, grid))
            elif lrs:
                grid = tuple(lrs)
            runs.extend(RunSpec(m.name, lr, seed) for lr in grid)
    return runs


def parse_lrs(text: str):
    """'0.005,0.01' (every chosen method) or 'GaLore=0.01,SARA-GaLore=0.02' (per method)."""
    if "=" not in text:
        return [float(x) for x in text.split(",")]
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in METHOD_BY_NAME or not value:
            raise ValueError(f"sara-bench: --lrs entry {item!r} is not METHOD=LR with METHOD one of "
                             f"{[m.name for m in METHODS]}")
        out.setdefault(name, []).append(float(value))
    return out


def size_fingerprint(size: Size, device: str) -> str:
    config = dataclasses.asdict(size)
    if config["data"] == "prose":  # the default: folders written before sizes named their data still resume
        del config["data"]
    blob = json.dumps(dict(config, device=device), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------- one run


def layer_type(name: str) -> str:
    """'layers.3.mlp.gate_proj.weight' -> 'gate_proj'."""
    return name.split(".")[-2]


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): 1 for rank one, n for isotropic."""
    sigma = torch.linalg.svdvals(matrix.double())
    if sigma.sum() <= 0:
        return 0.0
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def lr_lambda(size: Size):
    warmup = max(1, size.steps // 10)

    def factor(step: int) -> float:  # GaLore's cosine: warmup to peak, then down to 10% of peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, size.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build(spec: RunSpec, size: Size, device: str):
    import sara_ds

    from . import corpus, llama

    torch.manual_seed(spec.seed)
    cfg = llama.LlamaConfig(vocab_size=corpus.vocab_size(size.data), hidden=size.hidden, layers=size.layers, heads=size.heads,
                            intermediate=size.ffn, max_seq=size.seq_len)
    model = llama.Llama(cfg).to(device)
    method = METHOD_BY_NAME[spec.method]
    groups = sara_ds.param_groups(model, rank=size.rank, update_proj_gap=size.update_proj_gap, scale=0.25)
    projected = dict(zip(groups[-1]["param_names"], groups[-1]["params"]))
    betas = (0.9, 0.95)
    if method.optimizer == "AdamW":
        params = model.parameters()
        if method.preset == "split":
            params = [dict(params=groups[0]["params"]), dict(params=groups[-1]["params"], lr=spec.lr * 0.25)]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=betas, eps=1e-8, weight_decay=0.0)
    else:
        cls = sara_ds.OPTIMIZERS[method.optimizer]
        moments = {} if cls is sara_ds.SaraAdafactor else dict(betas=betas, eps=1e-8)  # Adafactor keeps its own
        opt = cls(groups, lr=spec.lr, preset=method.preset, seed=spec.seed, **moments)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(size))
    return model, opt, sched, projected


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def token_losses(logits_of, windows: torch.Tensor, batch: int, device: str) -> dict:
    """The held-out loss of ``windows`` ([n, seq_len + 1]) with its precision: the mean over every predicted token,
    its standard error (the per-token variance over the tokens evaluated, divided by their count), and each
    window's mean loss, from which a paired difference between two runs gets its own standard error on the same
    tokens (``report.paired_window_se``; tokens of one window share their context, windows hardly do)."""
    total, total_sq, count = 0.0, 0.0, 0
    # allocated once: a small tensor kept per batch would pin the heap above each batch's large freed logits under
    # the harness's malloc settings (MALLOC_ENV), ~15 GB over 2^20 tokens
    per_window = torch.empty(len(windows), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch].to(device)
            logits = logits_of(w[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                     reduction="none").double().view(len(w), -1)
            total += float(loss.sum())
            total_sq += float(loss.square().sum())
            count += loss.numel()
            per_window[i:i + len(w)] = loss.mean(dim=1)
    mean = total / count
    variance = max(0.0, total_sq / count - mean * mean) * count / max(1, count - 1)
    return dict(loss=mean, se=math.sqrt(variance / count), tokens=count, windows=per_window)


def window_se(window_losses: torch.Tensor) -> float:
    """Standard error of the mean loss from its windows' means (equal-sized windows): allows for tokens of one
    window being correlated, which the per-token figure does not."""
    n = len(window_losses)
    return float(window_losses.double().std() / math.sqrt(n)) if n > 1 else float("nan")


def train_run(spec: RunSpec, size: Size, out_dir: str, device: str = "cpu", progress=None, stop_after=None) -> dict:
    """Train one (method, lr, seed); resumes from its checkpoint; returns the result record."""
    from . import corpus

    model, opt, sched, projected = build(spec, size, device)
    data = corpus.Batches(corpus.token_ids("train", size.data), size.seq_len, size.batch, seed=spec.seed)
    val = list(corpus.validation_batches(size.seq_len, size.batch, size.eval_batches, size.data))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    ckpt_path = os.path.join(out_dir, "checkpoints", f"{spec.run_id}.pt")
    initial = {n: p.detach().float().cpu().clone() for n, p in projected.items()}
    record = dict(run_id=spec.run_id, method=spec.method, lr=spec.lr, seed=spec.seed, val=[], overlap=[],
                  effective_rank=[], train_loss=[], nonfinite_steps=0, seconds=0.0)
    start = 0
    if os.path.exists(ckpt_path):
        saved = torch.load(ckpt_path, weights_only=True)  # plain tensors and numbers, by design
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        initial, start = saved["initial"], saved["step"]
        record = json.loads(saved["record"])
    is_sara = hasattr(opt, "subspace_overlaps")
    gap = size.update_proj_gap

    def forward(x, y=None):
        if autocast is None:
            return model(x, y)
        with autocast:
            return model(x, y)

    def held_out_loss(batches) -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in batches:
                total += forward(x.to(device), y.to(device)).item() * y.numel()
                count += y.numel()
        model.train()
        return total / count

    def final_evaluation() -> None:
        """Every window of both held-out splits (up to ``final_eval_tokens``): the figures the report compares,
        with their standard errors, and each window's mean loss in ``windows/<run id>.npz`` for paired ones."""
        t_eval = time.time()
        model.eval()
        found = {}
        for split in ("val", "select"):
            windows = corpus.held_out_windows(size.seq_len, size.data, split, size.final_eval_tokens)
            found[split] = token_losses(forward, windows, size.batch, device)
            record.update({f"{split}_loss": found[split]["loss"], f"{split}_se": found[split]["se"],
                           f"{split}_tokens": found[split]["tokens"],
                           f"{split}_window_se": window_se(found[split]["windows"])})
        model.train()
        record["eval_seconds"] = time.time() - t_eval
        folder = os.path.join(out_dir, "windows")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{spec.run_id}.npz")
        with open(f"{path}.tmp", "wb") as f:
            numpy.savez_compressed(f, **{split: found[split]["windows"].float().numpy() for split in found})
        os.replace(f"{path}.tmp", path)

    def evaluate(step: int) -> None:
        loss = held_out_loss(val)
        ranks = {}
        for name, p in projected.items():
            ranks.setdefault(layer_type(name), []).append(effective_rank(p.detach().float().cpu() - initial[name]))
        record["val"].append([step, loss])
        record["effective_rank"].append([step, {k: sum(v) / len(v) for k, v in ranks.items()}])

    t0 = time.time() - record["seconds"]
    model.train()
    for step in range(start, size.steps):
        x, y = data.get(step)
        loss = forward(x.to(device), y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            record["nonfinite_steps"] += 1
        done = step + 1
        if done % 10 == 0 or done == size.steps:
            record["train_loss"].append([done, value])
        if is_sara and step % gap == 0 and step > 0:  # the step that refreshed (OSD: measured one step earlier)
            by_type = {}
            for name, v in opt.subspace_overlaps().items():
                if not math.isnan(v):
                    by_type.setdefault(layer_type(name), []).append(v)
            if by_type:
                record["overlap"].append([done, {k: sum(v) / len(v) for k, v in by_type.items()}])
        if done % size.eval_every == 0 or done == size.steps:
            evaluate(done)
        if progress is not None:
            progress(spec.run_id, done, size.steps, value)
        if done % size.checkpoint_every == 0 and done < size.steps:
            record["seconds"] = time.time() - t0
            _atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                              initial=initial, step=done, record=json.dumps(record)), ckpt_path)
            if stop_after is not None and done >= stop_after:
                raise RunInterrupted(f"sara-bench: {spec.run_id} stopped after step {done} as asked; "
                                     "rerun the same command to continue from its checkpoint")
    record["seconds"] = time.time() - t0  # training and the curve's evaluations
    record["val_curve_loss"] = record["val"][-1][1]
    # the reported validation figure and the select split learning rates are chosen on, apart from it
    final_evaluation()
    record["val_ppl"] = math.exp(record["val_loss"]) if math.isfinite(record["val_loss"]) else float("inf")
    if is_sara:
        record["state_bytes"] = opt.state_bytes()
    return record


# ---------------------------------------------------------------------------- the harness


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(spec: RunSpec, size: Size, out_dir: str, device: str, queue, stop_after) -> dict:
    last = [0.0]

    def progress(run_id, done, total, loss):
        now = time.time()
        if now - last[0] > 2 or done == total:
            last[0] = now
            queue.put((run_id, done, total, loss))

    return train_run(spec, size, out_dir, device, progress, stop_after)


def _progress_line(status, first_seen, finished_here, todo, steps, t0, now, done, total) -> str:
    """What is running, and an ETA from this invocation's own pace (steps per second over all runs)."""
    walked = finished_here * steps + sum(s - first_seen[r] for r, (s, _, _) in status.items())
    pace = walked / max(now - t0, 1e-9)  # steps/s over all job slots
    unstarted = todo - finished_here - len(status)
    left = sum(t - s for s, t, _ in status.values()) + unstarted * steps
    eta = _fmt_seconds(left / pace) if pace > 0 else "?"
    running = ", ".join(f"{r} {s}/{t} (loss {lo:.2f})" for r, (s, t, lo) in sorted(status.items()))
    return f"[bench] {done}/{total} runs done | running: {running} | {pace:.1f} steps/s | ETA {eta}"


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_benchmark(size_name: str, out_dir: str, jobs: int | None = None, device: str = "cpu", methods=None,
                  seeds=None, steps: int | None = None, stop_after: int | None = None, log=print,
                  command: str | None = None, data: str | None = None, lrs=None) -> dict:
    """Run every planned (method, lr, seed) not yet in ``out_dir/results.jsonl``; returns all results."""
    import concurrent.futures as cf
    import multiprocessing as mp

    if size_name not in SIZES:
        raise ValueError(f"sara-bench: unknown size={size_name!r}; choose one of {sorted(SIZES)}")
    for m in methods or ():
        if m not in METHOD_BY_NAME:
            raise ValueError(f"sara-bench: unknown method={m!r}; choose from {[x.name for x in METHODS]}")
    size = SIZES[size_name]
    if steps is not None:
        size = dataclasses.replace(size, steps=steps, eval_every=min(size.eval_every, steps),
                                   checkpoint_every=min(size.checkpoint_every, steps))
    if data is not None:
        from . import corpus

        if data not in corpus.DATA:
            raise ValueError(f"sara-bench: unknown data={data!r}; choose one of {corpus.DATA}")
        size = dataclasses.replace(size, data=data)
    jobs = jobs or size.jobs
    os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    fingerprint = size_fingerprint(size, device)
    meta = dict(size=size_name, config=dataclasses.asdict(size), device=device, fingerprint=fingerprint,
                rank=size.rank, update_proj_gap=size.update_proj_gap, torch=torch.__version__, command=command)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"sara-bench: {out_dir} holds results of a different configuration "
                f"(size={old.get('size')!r}, fingerprint {old.get('fingerprint')}; now size={size_name!r}, "
                f"fingerprint {fingerprint}); pass another --out or remove that folder")
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    results_path = os.path.join(out_dir, "results.jsonl")
    done = load_results(results_path)
    planned = plan(size, methods, seeds, lrs)
    todo = [s for s in planned if s.run_id not in done]
    total_runs = len(planned)
    log(f"[bench] size={size_name} ({size.layers}x{size.hidden} LLaMA, r={size.rank}, T={size.update_proj_gap}, "
        f"{size.steps} steps of {size.batch}x{size.seq_len}) device={device} jobs={jobs}: "
        f"{total_runs - len(todo)} of {total_runs} runs already in {results_path}, {len(todo)} to go")
    if not todo:
        return done
    for k, v in MALLOC_ENV.items():  # inherited by the spawned workers (glibc reads them at process start)
        os.environ.setdefault(k, v)
    if threading.current_thread() is threading.main_thread():
        # SLURM (preemption, time limit) and `kill` send SIGTERM: stop the way Ctrl-C does, runs resumable
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    queue = manager.Queue()
    threads = 1 if device == "cpu" else max(1, (os.cpu_count() or 1) // jobs)
    status, finished_here, t0, last_print = {}, 0, time.time(), 0.0
    first_seen = {}  # run_id -> its step at the first progress report (resumed runs start mid-way)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(threads,)) as pool:
        futures = {pool.submit(_worker, s, size, out_dir, device, queue, stop_after): s for s in todo}
        pending = set(futures)
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=1.0)
                while not queue.empty():
                    run_id, step, total, loss = queue.get()
                    first_seen.setdefault(run_id, step)
                    status[run_id] = (step, total, loss)
                for fut in finished:
                    spec = futures[fut]
                    rec = fut.result()  # a failed or interrupted run stops the benchmark with its message
                    append_result(results_path, rec)
                    done[spec.run_id] = rec
                    finished_here += 1
                    status.pop(spec.run_id, None)
                    ckpt = os.path.join(out_dir, "checkpoints", f"{spec.run_id}.pt")
                    for path in (ckpt, f"{ckpt}.tmp"):  # .tmp: a save cut short by an earlier kill
                        if os.path.exists(path):
                            os.remove(path)
                    log(f"[bench] finished {spec.run_id}: val ppl {rec['val_ppl']:.2f} in {rec['seconds']:.0f}s "
                        f"({total_runs - len(todo) + finished_here}/{total_runs})")
                now = time.time()
                if status and now - last_print >= 15:
                    last_print = now
                    log(_progress_line(status, first_seen, finished_here, len(todo), size.steps, t0, now,
                                       total_runs - len(todo) + finished_here, total_runs))
        except BaseException:
            # Ctrl-C or a failed run: stop the other runs now; their checkpoints are on disk
            for fut in pending:
                fut.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    manager.shutdown()
    return done


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="sara-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="cpu", choices=sorted(SIZES))
    ap.add_argument("--out", default=None, help="results folder (default: bench_results/<size>)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on CPU, 1 on GPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (cuda uses bf16 autocast)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHOD_BY_NAME))
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the size's, 0,1,2)")
    ap.add_argument("--steps", type=int, default=None, help="override the size's step count")
    ap.add_argument("--lrs", default=None, help="comma-separated lrs for every chosen method (a sweep), or "
                    "METHOD=LR entries for some; each method's lr is then chosen on the held-out select split, not on "
                    "the reported one")
    ap.add_argument("--data", default=None, choices=("prose", "code", "code4k"),
                    help="override the size's corpus: the bundled prose, or the code corpus "
                         "(python -m sara_bench.code_corpus build [--vocab 4096]) with its 32000-token vocabulary "
                         "(code; gpu60m trains on it) or the prose's 4096 (code4k)")
    ap.add_argument("--docs", default=None, help="also write the report (table + plots) into this folder")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the report from results.jsonl")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt mid-run
    args = ap.parse_args(argv)
    out = args.out or os.path.join("bench_results", args.size)
    methods = args.methods.split(",") if args.methods else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    command = " ".join(["sara-bench", *(argv if argv is not None else sys.argv[1:])])
    if not args.report_only:
        try:
            run_benchmark(args.size, out, args.jobs, args.device, methods, seeds, args.steps, args.stop_after,
                          log=lambda m: print(m, flush=True), command=command, data=args.data,
                          lrs=parse_lrs(args.lrs) if args.lrs else None)
        except (RunInterrupted, KeyboardInterrupt) as e:
            print(f"[bench] interrupted ({e or 'Ctrl-C'}); finished runs are in {out}/results.jsonl and unfinished "
                  "ones resume from their checkpoints when the same command is run again", flush=True)
            return 130
    from . import report

    for folder in {out, args.docs} - {None}:
        paths = report.write_report(out, folder, command=command)
        print(f"[bench] report: {', '.join(paths)}", flush=True)
    return 0
