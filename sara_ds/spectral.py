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

import warnings

import torch
from torch import Tensor

# How a refresh forms the spectrum of a matrix held whole on one process, and of one split over ranks.
LOCAL_SPECTRA = ("svd", "gram", "sketch")
TP_SPECTRA = ("tsqr", "gram", "sketch")


def _same(t: Tensor) -> Tensor:
    return t


def _alone(t: Tensor) -> list:
    return [t]


def full_svd(matrix: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """Thin fp32 SVD of the matrix as stored (on a CPU the same call and orientation as galore-torch,
    so singular-vector signs, and hence trajectories, match it)."""
    a = matrix.float()
    if not a.is_cuda:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return s, (u if left else vh.mT)
    tall = a.shape[-2] >= a.shape[-1]
    u, s, vh = gesvda_or_default(a if tall else a.mT)
    return s, ((u if tall else vh.mT) if left else (vh.mT if tall else u))


def gesvda_or_default(tall: Tensor, svd=torch.linalg.svd) -> tuple[Tensor, Tensor, Tensor]:
    """cuSOLVER's batched gesvda (tall matrices only). On an H200 it took 1/4 to 1/7 of the time of torch's
    default CUDA driver (gesvdj) at LLaMA-7B shapes and 1/9 to 1/21 on LLaMA-60M..350M banks, with singular
    vectors orthonormal to 3e-6 where gesvdj's were off by 2.7e-3. It refuses to converge on a spectrum spanning
    ~15 decades (d_i = (i+1)^-2 at 4096 columns), so such a batch is decomposed again by torch's default
    driver, with a warning: the same SVD, slower."""
    try:
        return svd(tall, full_matrices=False, driver="gesvda")
    except torch.linalg.LinAlgError as error:
        warnings.warn(f"sara_ds: cuSOLVER's gesvda did not converge on a {tuple(tall.shape)} refresh ({error}); "
                      "that refresh used torch's default SVD driver", RuntimeWarning, stacklevel=3)
        return svd(tall, full_matrices=False)


def tsqr(a: Tensor, all_gather=_alone, height: int | None = None) -> tuple[Tensor, Tensor]:
    """``height``: the rows every rank's R factor is padded to where shards differ in size (zero rows change no
    singular value), so that they can be gathered."""
    r = torch.linalg.qr(a, mode="r").R
    if height is not None and height > r.shape[-2]:
        r = torch.cat([r, r.new_zeros(height - r.shape[-2], r.shape[-1])])
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
