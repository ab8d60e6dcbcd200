"""Spectra of a gradient on the side its basis lives on: pure functions.

Each returns ``(sigma, vectors)``: singular values, descending, and the matching
singular vectors of the basis side as columns, so every subspace rule works
unchanged on any of them.

The decompositions other than ``full_svd`` take A oriented as ``rows x n``, with n
the basis side. Under tensor parallelism A = [A_1; A_2; ...] is stacked by rows
over the ranks, and the functions take their reductions as arguments
(``all_gather`` returns every rank's tensor, ``all_reduce`` sums), so the same
maths runs in one process (the defaults) and across TP ranks
(``sharding.tensor_parallel`` passes its collectives):

  tsqr    SVD of the stacked R factors of the local QRs. Backward-stable: the
          small singular values importance sampling still draws are as accurate
          as a direct SVD's.
  gram    eigh of sum_i A_i^T A_i (n x n). Squares the condition number:
          singular values below ~sqrt(eps) * sigma_max lose their accuracy.
  sketch  randomized range finder with k = r + oversample columns, q power
          iterations and Rayleigh-Ritz; the rules then choose among the top-k
          estimated directions. Cuts refresh cost at 7B shapes (see
          benchmarks/refresh.py), in one process as under TP.
"""
from __future__ import annotations

import torch
from torch import Tensor

# How a refresh forms the spectrum of a matrix held whole on one process.
LOCAL_SPECTRA = ("svd", "gram", "sketch")


def _same(t: Tensor) -> Tensor:
    return t


def _alone(t: Tensor) -> list:
    return [t]


def full_svd(matrix: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """Thin fp32 SVD of the matrix as stored (the same call and orientation as galore-torch,
    so singular-vector signs, and hence trajectories, match it)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return s, (u if left else vh.mT)


def tsqr(a: Tensor, all_gather=_alone) -> tuple[Tensor, Tensor]:
    r = torch.linalg.qr(a, mode="r").R
    _, s, vh = torch.linalg.svd(torch.cat(all_gather(r)), full_matrices=False)
    return s, vh.mT


def gram_eigh(a: Tensor, all_reduce=_same) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(all_reduce(a.mT @ a))
    return evals.flip(-1).clamp_min(0).sqrt(), evecs.flip(-1)  # descending; a batch of matrices alike


def sketch_test_matrix(generator, total_rows: int, k: int) -> Tensor:
    """The Gaussian test matrix Omega (total_rows x k), drawn from the refresh's seed without
    consuming the refresh generator, so every TP rank draws the same one and the rules'
    sampling stream is the same as with an exact spectrum."""
    seed = int(generator.initial_seed()) ^ 0x5EED if generator is not None else 0
    return torch.randn(total_rows, k, generator=torch.Generator().manual_seed(seed))


def sketch(a: Tensor, omega: Tensor, power_iters: int, all_reduce=_same) -> tuple[Tensor, Tensor]:
    """``omega``: this process's rows of the shared test matrix (rows x k), drawn on the CPU so that
    every device draws the same one."""
    y = all_reduce(a.mT @ omega.to(a.device))                     # n x k
    for _ in range(power_iters):
        q = torch.linalg.qr(y).Q
        y = all_reduce(a.mT @ (a @ q))
    q = torch.linalg.qr(y).Q
    b = a @ q
    evals, evecs = torch.linalg.eigh(all_reduce(b.mT @ b))        # Rayleigh-Ritz on span(Q)
    return evals.flip(0).clamp_min(0).sqrt(), q @ evecs.flip(1)


def sketch_size(n: int, rank: int, oversample: int) -> int:
    return min(n, rank + oversample)


def local_spectrum(matrix: Tensor, left: bool, method: str = "svd", generator=None, rank: int | None = None,
                   oversample: int = 8, power_iters: int = 2) -> tuple[Tensor, Tensor]:
    """The spectrum of a matrix held whole: ``full_svd``, ``gram_eigh`` or the ``sketch`` of it."""
    if method == "svd":
        return full_svd(matrix, left)
    a = (matrix.mT if left else matrix).float()  # basis side on the columns
    if method == "gram":
        return gram_eigh(a)
    k = sketch_size(a.shape[1], rank if rank is not None else a.shape[1], oversample)
    return sketch(a, sketch_test_matrix(generator, a.shape[0], k).to(a), power_iters)
