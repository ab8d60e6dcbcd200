"""One subspace refresh at LLaMA-7B layer shapes: the full SVD against gram-eigh and the sketch, in one run.

For each shape it times, on the same matrix and the same threads:
  * svd     spectrum='svd': on a CPU torch.linalg.svd(G, full_matrices=False), galore-torch's call; on CUDA
            cuSOLVER's gesvda driver;
  * gesvdj, gesvd  on CUDA only: the same SVD through torch's default driver and the QR-iteration one;
  * gram    eigh of A^T A on the basis side (tp_spectrum='gram' at TP=1);
  * sketch  randomized range finder, k = rank + oversample, q power iterations (spectrum='sketch'),
and prints each one's time, its speed-up over the SVD, the residual ratio
||A - A V_r V_r^T||_F / ||A - A_r||_F of its top-r directions (1 is optimal), and the
total-variation distance between SARA's inclusion probabilities over the singular
directions drawn from its spectrum and from the exact one (Monte Carlo over --draws
draws each; the distance between two Monte Carlo runs on the exact spectrum is printed
as the noise floor).

The matrix is synthetic (nothing is downloaded): G = X diag(d) Y with Gaussian X, Y and
d_i = (i+1)^-decay, a decaying spectrum like a gradient's; --decay 0 gives the flat
spectrum of a Gaussian matrix, the sketch's worst case.

    python benchmarks/refresh.py                      # LLaMA-7B shapes, r=1024 (minutes on a CPU)
    python benchmarks/refresh.py --shapes 1024x1024 --rank 128
"""
import argparse
import time

import torch

from sara_ds import projector, spectral, subspace

SEVEN_B = "4096x4096,11008x4096,4096x11008"  # q/k/v/o, gate/up, down


def synthetic_gradient(rows, cols, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = min(rows, cols)
    d = (torch.arange(m, dtype=torch.float32) + 1) ** -decay
    x = torch.randn(rows, m, generator=g) / rows ** 0.5
    y = torch.randn(m, cols, generator=g) / cols ** 0.5
    return (x * d) @ y


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tuple(t.cpu() for t in out), time.perf_counter() - start


def svd_driver(matrix, left, driver):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False, driver=driver)
    return s, (u if left else vh.mT)


def inclusion(sigma, n, rank, draws, seed):
    """Monte Carlo inclusion probability of each of n singular directions under SARA's draw."""
    counts = torch.zeros(n)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        counts[subspace.importance_indices(sigma, rank, gen)] += 1
    return counts / draws


def tv(p, q, rank):
    return 0.5 * (p - q).abs().sum().item() / rank  # inclusion probabilities sum to r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SEVEN_B, help="comma-separated ROWSxCOLS")
    ap.add_argument("--rank", type=int, default=1024)
    ap.add_argument("--oversample", default="16,r,3r",
                    help="comma-separated sketch oversamples p (k = rank + p); 'r', '3r': multiples of the rank")
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--decay", type=float, default=1.0)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    r = args.rank
    oversamples = [int(o[:-1] or 1) * r if o.endswith("r") else int(o) for o in args.oversample.split(",")]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; r={r}, sketch k=r+{oversamples}, "
          f"q={args.power_iters}, spectrum d_i=(i+1)^-{args.decay}, {args.draws} draws")
    print(f"{'shape':>12} {'method':>7} {'seconds':>9} {'vs svd':>7} {'residual':>9} {'TV(incl.)':>10} {'|VtV-I|':>9}"
          "   (k=...: the sketch)")
    for shape in args.shapes.split(","):
        rows, cols = (int(x) for x in shape.split("x"))
        grad = synthetic_gradient(rows, cols, args.decay)
        left = projector.basis_on_left(rows, cols, "std")
        a = grad.mT if left else grad  # basis side on the columns
        n = a.shape[1]
        gen = torch.Generator().manual_seed(3)
        on = grad.to(device)
        results = {"svd": timed(lambda: spectral.full_svd(on, left), device)}
        if device.type == "cuda":  # sara_ds's gesvda above; torch's default (gesvdj) and QR-iteration drivers
            results["gesvdj"] = timed(lambda: svd_driver(on, left, "gesvdj"), device)
            results["gesvd"] = timed(lambda: svd_driver(on, left, "gesvd"), device)
        results["gram"] = timed(lambda: spectral.gram_eigh(on.mT if left else on), device)
        for p in oversamples:
            results[f"k={spectral.sketch_size(n, r, p)}"] = timed(
                lambda: spectral.local_spectrum(on, left, "sketch", gen, r, p, args.power_iters), device)
        exact_sigma = results["svd"][0][0]
        best = exact_sigma[r:].double().square().sum().sqrt()
        exact_incl = inclusion(exact_sigma, n, r, args.draws, seed=1)
        floor = tv(exact_incl, inclusion(exact_sigma, n, r, args.draws, seed=2), r)
        svd_seconds = results["svd"][1]
        a_on = a.to(device)
        for method, ((sigma, vectors), seconds) in results.items():
            v = vectors[:, :r].to(device)
            residual = ((a_on - (a_on @ v) @ v.mT).double().norm() / best).item()
            incl = inclusion(sigma, n, r, args.draws, seed=2)
            every = vectors.to(device)
            orthogonality = (every.mT @ every - torch.eye(every.shape[1], device=device)).abs().max().item()
            print(f"{shape:>12} {method:>7} {seconds:9.2f} {svd_seconds / seconds:6.1f}x {residual:9.4f} "
                  f"{tv(exact_incl, incl, r):10.4f} {orthogonality:9.1e}")
        print(f"{shape:>12} {'':>7} (TV noise floor of {args.draws} draws: {floor:.4f}; "
              f"sigma_r/sigma_1 = {(exact_sigma[r - 1] / exact_sigma[0]).item():.3g})")


if __name__ == "__main__":
    main()
