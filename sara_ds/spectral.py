"""Spectra of a gradient on the side the basis lives on.

``local_spectrum`` is the single-process case. Sharded variants (tensor
parallel) live in ``sharding.tensor_parallel`` and return the same pair: the
singular values (descending) and the matching singular vectors of the basis
side as columns, so every subspace rule works unchanged on either.
"""
from __future__ import annotations

import torch
from torch import Tensor


def local_spectrum(matrix: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """Thin fp32 SVD of the matrix as stored (the same call and orientation as galore-torch,
    so singular-vector signs, and hence trajectories, match it)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return s, (u if left else vh.mT)
