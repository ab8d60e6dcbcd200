"""Optimizer step time, dispatched ops, host syncs and state at LLaMA shapes, side by side with peers in one run.

For each GaLore-protocol size it builds the whole model's parameters (``--scope model``, the default:
every block's q, k, v, o, gate, up, down, projected, plus embeddings, lm_head and norms at full rank;
``--scope block``: one block's seven matrices) and times
  * sara_ds.SaraAdamW (preset sara, preset galore, sara with ``fused=True``: full-rank tensors
    through torch's fused AdamW kernel, and sara with ``finite_flag='device'``: no host sync;
    ``foreach`` at its default: banks on a GPU, per matrix on a CPU),
  * galore-torch GaLoreAdamW at the same rank / T / scale (same full-rank group),
  * torch.optim.AdamW fused, foreach and single-tensor (full rank),
and prints the step time amortised over T with the refresh included
(= (T-1)/T * ordinary step + 1/T * refresh step), its ratio to galore-torch, the dispatched
ops and host syncs (``aten._local_scalar_dense``) of one ordinary step, counted with a
TorchDispatchMode, and the projected matrices' state against the analytic r*(min + 2*max).

    python benchmarks/optimizer_step.py --sizes 60m,130m --repeats 5
    python benchmarks/optimizer_step.py --device cuda --sizes 60m,130m,350m,1b   # on a GPU
"""
import argparse
import gc
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sara_ds
from sara_bench.llama import PAPER_SIZES  # the harness's example model (pip install -e harness)
from train_step import galore_adamw  # noqa: E402  (benchmarks/, beside this file)

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}


def block_shapes(size):
    c = PAPER_SIZES[size]
    h, f = c.hidden, c.intermediate
    return [(h, h)] * 4 + [(f, h), (f, h), (h, f)]


def model_shapes(size, scope):
    """(projected matrix shapes, full-rank shapes) of the whole model, or of one block."""
    c = PAPER_SIZES[size]
    if scope == "block":
        return block_shapes(size), []
    full_rank = [(c.vocab_size, c.hidden)] * 2 + [(c.hidden,)] * (2 * c.layers + 1)  # embed, lm_head, norms
    return block_shapes(size) * c.layers, full_rank


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def make_params(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(*s, generator=g) * 0.02).to(device)) for s in shapes]
    grads = [torch.randn(*s, generator=g).to(device) for s in shapes]
    return params, grads


def timed_steps(opt, params, grads, steps, device):
    times = []
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure(name, build, projected, full_rank, gap, repeats, device):
    params, grads = make_params(projected + full_rank, device)
    opt = build(params[:len(projected)], params[len(projected):])
    refresh = timed_steps(opt, params, grads, 1, device)[0]  # step 0 refreshes (for the projected optimizers)
    timed_steps(opt, params, grads, 1, device)  # warm-up (sara_ds stacks its banks here)
    steady = statistics.median(timed_steps(opt, params, grads, repeats, device))
    counter = CountOps()
    for p, g in zip(params, grads):
        p.grad = g
    with counter:
        opt.step()
    state = 0
    for p in params[:len(projected)]:
        for v in (opt.state_of(p) if hasattr(opt, "state_of") else opt.state[p]).values():
            if not isinstance(v, torch.Tensor):  # galore-torch keeps its basis inside a projector object
                v = getattr(v, "ortho_matrix", None)
            if isinstance(v, torch.Tensor):
                state += v.numel() * v.element_size()
    amortised = steady if gap is None else ((gap - 1) * steady + refresh) / gap
    del opt, params, grads
    gc.collect()
    return dict(name=name, steady=steady, refresh=refresh if gap else None, amortised=amortised, state=state,
                ops=counter.ops, syncs=counter.syncs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="60m,130m,350m", help="of 60m,130m,350m,1b (1b needs ~25 GiB for AdamW)")
    ap.add_argument("--scope", choices=("model", "block"), default="model")
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap T used for amortisation")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=None, help="comma-separated row names to run (exact, as printed), e.g. "
                    "'SaraAdamW sara,galore-torch GaLoreAdamW' at 1b on a 24 GiB box")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", message="sara_ds:")  # a refresh that fell back to another SVD driver shows
    GaLoreAdamW, why = galore_adamw()
    if GaLoreAdamW is None:
        print(f"{why}: its column is skipped (pip install galore-torch)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {where}; scope {args.scope}; T={args.gap}; "
          f"times are medians of {args.repeats} ordinary steps\n")
    for size in args.sizes.split(","):
        projected, full_rank = model_shapes(size, args.scope)
        rank, gap = RANKS[size], args.gap
        analytic = 4 * sum(rank * (min(s) + 2 * max(s)) for s in projected)

        def groups(proj, rest):
            out = [dict(params=proj, rank=rank, update_proj_gap=gap, scale=0.25, proj_type="std")]
            return out + ([dict(params=rest)] if rest else [])

        variants = (("sara", dict(preset="sara")), ("galore", dict(preset="galore")),
                    ("sara fused", dict(preset="sara", fused=True)),
                    ("sara device-flag", dict(preset="sara", finite_flag="device")))
        wanted = None if args.only is None else set(args.only.split(","))
        run = lambda name: wanted is None or name in wanted  # noqa: E731
        rows = [measure(f"SaraAdamW {label}", lambda a, b, kw=kw: sara_ds.SaraAdamW(groups(a, b), lr=1e-3, **kw),
                        projected, full_rank, gap, args.repeats, device) for label, kw in variants
                if run(f"SaraAdamW {label}")]
        if GaLoreAdamW is not None and run("galore-torch GaLoreAdamW"):
            rows.append(measure("galore-torch GaLoreAdamW", lambda a, b: GaLoreAdamW(
                groups(a, b), lr=1e-3, no_deprecation_warning=True), projected, full_rank, gap, args.repeats, device))
        for impl, kw in (("fused", dict(fused=True)), ("foreach", dict(foreach=True)),
                         ("single-tensor", dict(foreach=False))):
            if run(f"torch AdamW {impl}"):
                    rows.append(measure(f"torch AdamW {impl}", lambda a, b, kw=kw: torch.optim.AdamW(a + b, lr=1e-3, **kw),
                                    projected, full_rank, None, args.repeats, device))
        galore = next((r for r in rows if r["name"].startswith("galore-torch")), None)
        params = sum(torch.Size(s).numel() for s in projected + full_rank)
        print(f"== LLaMA-{size} ({args.scope}: {params / 1e6:.0f}M parameters, {len(projected)} projected matrices, "
              f"r={rank})")
        print(f"   {'optimizer':<26}{'proj. state MiB':>16}{'=analytic':>10}{'step ms':>9}{'refresh s':>10}"
              f"{'amortised':>10}{'/galore':>8}{'ops':>7}{'syncs':>6}")
        for r in rows:
            exact = "-" if "torch AdamW" in r["name"] else ("yes" if r["state"] == analytic else "no")
            ratio = f"{r['amortised'] / galore['amortised']:.2f}" if galore else "-"
            refresh = f"{r['refresh']:.2f}" if r["refresh"] else "-"
            print(f"   {r['name']:<26}{r['state'] / 2**20:>16.1f}{exact:>10}{r['steady'] * 1e3:>9.1f}{refresh:>10}"
                  f"{r['amortised'] * 1e3:>10.1f}{ratio:>8}{r['ops']:>7}{r['syncs']:>6}")
        print()


if __name__ == "__main__":
    main()
