"""Does torch.compile pay for a bank's ordinary step? Eager against compiled, side by side in one run.

A bank's ordinary step (sara_ds.functional.projected_step with the AdamW base, no Fira) is, in pure
functions: stack the k gradients, R = B^T G (one bmm), the AdamW moments and direction on [k, r, n],
B N back into the parameter layout (one bmm), the weights' foreach add and the decoupled decay. This
runs exactly those functions (``projector``, ``updates``) eagerly, and the same function under
``torch.compile`` (inductor; on CUDA also ``mode="reduce-overhead"``, CUDA graphs). The bias-correction
step size goes in as a 0-d tensor for the compiled variants, so that a new step count does not
recompile; eager takes it as a Python float, as the optimizer does.

    python benchmarks/compiled_bank_step.py                       # CPU, LLaMA-60M and -130M MLP banks
    python benchmarks/compiled_bank_step.py --device cuda --sizes 60m,130m,350m,1b
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sara_ds import projector, updates  # noqa: E402

# (rows, cols, matrices in the bank, rank): the up/gate projections of the GaLore-protocol sizes
BANKS = {"60m": (1376, 512, 16, 128), "130m": (2048, 768, 24, 256), "350m": (2736, 1024, 48, 256),
         "1b": (5461, 2048, 48, 512)}
HP = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True}
LR, SCALE, DECAY = 1e-3, 0.25, 0.1


def bank_step(grads, weights, basis, state, step_size):
    """One ordinary step of a bank with a right basis (rows > cols), as the optimizer runs it."""
    g = torch.stack(grads).float()
    r = projector.project(projector.oriented(g, False), basis)
    n, _ = updates.adamw_direction(r, state, HP, 10)
    update = projector.project_back_to_param(n, basis, False).mul_(SCALE)
    if isinstance(step_size, float):
        torch._foreach_add_(weights, list(update.unbind(0)), alpha=-step_size)
    else:  # a 0-d tensor: a new step count does not recompile
        torch._foreach_add_(weights, torch._foreach_mul(list(update.unbind(0)), -step_size))
    torch._foreach_add_(weights, weights, alpha=-LR * DECAY)


def timed(fn, args, repeats, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (and compilation)
        fn(*args)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="60m,130m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {where}; medians of {args.repeats} ordinary bank steps (AdamW base)\n")
    print(f"{'bank (k x rows x cols, r)':<30}{'variant':<26}{'ms':>9}{'/eager':>8}")
    variants = [("compiled (inductor)", dict())]
    if device.type == "cuda":
        variants.append(("compiled reduce-overhead", dict(mode="reduce-overhead")))
    for size in args.sizes.split(","):
        rows, cols, k, rank = BANKS[size]
        torch.manual_seed(0)
        grads = [torch.randn(rows, cols, device=device) for _ in range(k)]
        weights = [torch.randn(rows, cols, device=device) * 0.02 for _ in range(k)]
        basis = torch.linalg.qr(torch.randn(k, cols, rank, device=device)).Q.contiguous()
        state = {"exp_avg": torch.zeros(k, rank, rows, device=device),
                 "exp_avg_sq": torch.zeros(k, rank, rows, device=device)}
        step_size = LR * updates.adamw_step_scale(HP, 10)
        label = f"{size}: {k} x {rows} x {cols}, r={rank}"
        eager = timed(bank_step, (grads, weights, basis, state, step_size), args.repeats, device)
        print(f"{label:<30}{'eager':<26}{eager * 1e3:>9.2f}{1.0:>8.2f}")
        for name, options in variants:
            torch.compiler.reset()
            compiled = torch.compile(bank_step, **options)
            t = timed(compiled, (grads, weights, basis, state, torch.tensor(step_size, device=device)), args.repeats,
                      device)
            print(f"{'':<30}{name:<26}{t * 1e3:>9.2f}{t / eager:>8.2f}")


if __name__ == "__main__":
    main()
