"""Where the basis sits and how gradients move in and out of it (pure functions).

All math after the side decision runs in one *canonical orientation*: the
oriented gradient A is G itself for a left basis and the view G^T for a right
basis, so B (d x r) always spans columns of A, R = B^T A is r x k, and the
rank axis of every low-rank tensor is dim -2. Every function reads only the last
two dims, so a bank of same-shape matrices stacked on a leading dim goes through unchanged. No rule, base or residual needs to
know which side it is on. Low-rank moments of a right-projected matrix are
therefore stored as the transpose of galore-torch's (r x m instead of m x r);
elementwise maths is unchanged by that.
"""
from __future__ import annotations

import torch
from torch import Tensor

PROJ_TYPES = ("std", "reverse_std", "left", "right")


def basis_on_left(rows: int, cols: int, proj_type: str, split_axis: int | None = None) -> bool:
    """GaLore's side rule on the whole matrix's shape: 'std' puts the basis on the smaller dimension (right when
    rows >= cols). ``split_axis``: the dim a tensor-parallel matrix is split on, given only to put the basis on
    the other, whole axis instead (``tp_side='unsplit'``: no per-step communication, another algorithm where the
    two sides differ)."""
    if split_axis is not None:
        return split_axis == 1
    if proj_type == "std":
        return rows < cols
    if proj_type == "reverse_std":
        return rows >= cols
    return proj_type == "left"


def as_matrix(t: Tensor) -> Tensor:
    """>2-D weights (conv kernels) are projected as (out, everything else)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def oriented(matrix: Tensor, left: bool) -> Tensor:
    return matrix if left else matrix.mT


def project(a: Tensor, basis: Tensor) -> Tensor:
    return basis.mT @ a


def project_back_to_param(n: Tensor, basis: Tensor, left: bool) -> Tensor:
    """B N, produced directly in the parameter's layout ((B N)^T = N^T B^T for a right basis), so
    the update is contiguous where the weight is and adding it is not a strided walk."""
    return basis @ n if left else n.mT @ basis.mT


def add_back_projection_(weight: Tensor, n: Tensor, basis: Tensor, left: bool, alpha: float) -> Tensor:
    """weight += alpha B N, in the parameter's layout, with one addmm_ straight into the weight: no m x n
    temporary (``project_back_to_param``'s product, with its rounding fused into the add)."""
    first, second = (basis, n) if left else (n.mT, basis.mT)
    return weight.addmm_(first, second, alpha=alpha)


def rank_axis_factor(factor: Tensor, left: bool) -> Tensor:
    """A per-column factor of the canonical orientation, shaped to broadcast over the parameter."""
    return factor.unsqueeze(-2) if left else factor.unsqueeze(-1)


def change_of_basis(new: Tensor, old: Tensor) -> Tensor:
    """C = B_new^T B_old, so coordinates in the old basis map to the new one by C @ x."""
    return new.mT @ old
