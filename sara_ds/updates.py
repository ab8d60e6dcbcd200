"""The base update rules run on the (projected or full) gradient, as pure functions.

Each base is three functions on a plain dict of tensors:

    init(x, projected, hp)      -> state dict for a gradient shaped like x
    direction(x, state, hp, n, reduce, keep)  -> (N, step_scale); n counts base updates so far (1-based);
                                  reduce sums a tensor over tensor-parallel shards of x's columns
    transport(state, C)         -> rotate rank-axis statistics into a new basis (C = B_new^T B_old)

``keep`` is the step's finite flag on the device (a 0-d bool tensor), or None when the host has
already decided to step. Where it is False the caller has zeroed x, and the rule must leave its
state as it was and return a zero N: every decay factor becomes 1 and every denominator infinite,
chosen with ``torch.where``, so no value is read back to the host. Where it is True the arithmetic
is the same, bit for bit, as with ``keep=None``.

The weight moves by  -lr * step_scale * scale * back(N). For projected tensors the
rank axis is dim -2 (see ``projector``). A matrix's rules read only its last two
dims, so a bank of same-shape matrices (``sara_ds.banks``) is the same call on
tensors with a leading bank dim: [k, r, n] projected gradients, [k, r] Adafactor rows.

AdamW follows galore-torch / HF ``AdamW`` exactly (eps added to sqrt(v) before
bias correction, bias correction folded into the step size) because that is the
peer the low-rank papers were measured with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Base:
    name: str
    init: Callable
    direction: Callable
    transport: Callable
    elementwise: bool  # full-rank update depends only on each element (safe on a ZeRO fragment)


def unless_skipped(keep, value: float, frozen: float):
    """``value`` on a step that is taken, ``frozen`` (a 0-d tensor on keep's device) on one that is skipped."""
    return value if keep is None else torch.where(keep, value, frozen)


# ---------------------------------------------------------------- AdamW

def adamw_init(x: Tensor, projected: bool, hp: dict) -> dict:
    return {"exp_avg": torch.zeros_like(x), "exp_avg_sq": torch.zeros_like(x)}


def adamw_direction(x: Tensor, state: dict, hp: dict, n: int, reduce=None, keep=None):
    beta1, beta2 = hp["betas"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(unless_skipped(keep, beta1, 1.0)).add_(x, alpha=1.0 - beta1)
    v.mul_(unless_skipped(keep, beta2, 1.0)).addcmul_(x, x, value=1.0 - beta2)
    direction = m / v.sqrt().add_(unless_skipped(keep, hp["eps"], math.inf))
    return direction, adamw_step_scale(hp, n)


def adamw_step_scale(hp: dict, n: int) -> float:
    beta1, beta2 = hp["betas"]
    return math.sqrt(1.0 - beta2**n) / (1.0 - beta1**n) if hp.get("correct_bias", True) else 1.0


def adamw_directions_foreach(xs: list, exp_avgs: list, exp_avg_sqs: list, hp: dict, n: int, keep=None):
    """``adamw_direction`` for a list of tensors at the same step count ``n``: the same arithmetic in
    the same order, one dispatch per operation instead of one per tensor (torch's foreach kernels)."""
    beta1, beta2 = hp["betas"]
    torch._foreach_mul_(exp_avgs, unless_skipped(keep, beta1, 1.0))
    torch._foreach_add_(exp_avgs, xs, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, unless_skipped(keep, beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, xs, xs, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, hp["eps"])
    directions = torch._foreach_div(exp_avgs, denom)
    if keep is not None:  # (a 0-d tensor added to a list would be read back to the host as a Scalar)
        torch._foreach_mul_(directions, keep)
    return directions, adamw_step_scale(hp, n)


def adamw_fused_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, hp: dict, n: int, keep=None) -> None:
    """``adamw_direction`` and the step, in place, through torch's fused AdamW kernel (one pass per tensor).

    torch adds eps to sqrt(v / (1 - beta2^n)); galore-torch / HF add it to sqrt(v) and fold the bias
    correction into the step size. Passing eps / sqrt(1 - beta2^n) makes the two the same update (equal
    up to round-off, not bit for bit). Decay is left to the caller, which applies it after the step as
    galore-torch does; torch's kernel would apply it before. ``keep`` goes in as the kernel's own
    ``found_inf``, which it reads on the device."""
    beta1, beta2 = hp["betas"]
    step = torch.full((), float(n), device=params[0].device)
    found_inf = None if keep is None else (~keep).float()
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [step] * len(params), lr=hp["lr"], beta1=beta1,
                        beta2=beta2, weight_decay=0.0, eps=hp["eps"] / math.sqrt(1.0 - beta2**n), amsgrad=False,
                        maximize=False, found_inf=found_inf)


def adamw_transport(state: dict, c: Tensor) -> None:
    # The first moment is a vector in the subspace and rotates exactly. The second
    # is a diagonal covariance; rotating it by C (.) C keeps it non-negative and
    # exact when C is a permutation (a refresh that reorders the same directions).
    state["exp_avg"].copy_(c @ state["exp_avg"])
    state["exp_avg_sq"].copy_(c.square() @ state["exp_avg_sq"])


# ---------------------------------------------------------------- Adafactor (Shazeer & Stern 2018)
# As HF's Adafactor with relative_step=False, scale_parameter=False, except that the optional first
# moment (beta1) averages lr-free directions; HF averages lr-scaled updates, which differs only while lr
# changes. Keeping lr out makes every base return a direction that the optimizer scales the same way.

def adafactor_init(x: Tensor, projected: bool, hp: dict) -> dict:
    if x.dim() == 2:
        state = {"exp_avg_sq_row": x.new_zeros(x.shape[0]), "exp_avg_sq_col": x.new_zeros(x.shape[1])}
    else:
        state = {"exp_avg_sq": torch.zeros_like(x)}
    if hp["beta1"]:
        state["exp_avg"] = torch.zeros_like(x)
    return state


def adafactor_direction(x: Tensor, state: dict, hp: dict, n: int, reduce=None, keep=None):
    reduce = reduce or (lambda t: t)
    beta2t = 1.0 - math.pow(n, hp["decay_rate"])
    decay = unless_skipped(keep, beta2t, 1.0)
    sq = x.square().add_(unless_skipped(keep, hp["eps"], 0.0))  # a skipped step's zeroed x adds nothing
    columns = reduce(x.new_full((), float(x.shape[-1])))  # the row mean runs over all shards (made on the device)
    if "exp_avg_sq_row" in state:  # a matrix, or a bank of them: per-matrix statistics over the last two dims
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(decay).add_(reduce(sq.sum(dim=-1)) / columns, alpha=1.0 - beta2t)
        col.mul_(decay).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = x * r_factor * col.rsqrt().unsqueeze(-2)
        rms = (reduce(update.square().sum(dim=(-2, -1))) / (columns * x.shape[-2])).sqrt()[..., None, None]
    else:
        v = state["exp_avg_sq"]
        v.mul_(decay).add_(sq, alpha=1.0 - beta2t)
        update = x * v.rsqrt()
        rms = (reduce(update.square().sum()) / (columns * (update.numel() // x.shape[-1]))).sqrt()
    update.div_((rms / hp["clip_threshold"]).clamp_(min=1.0))
    if hp["beta1"]:
        m = state["exp_avg"]
        m.mul_(unless_skipped(keep, hp["beta1"], 1.0)).add_(update, alpha=1.0 - hp["beta1"])
        update = m.clone() if keep is None else torch.where(keep, m, 0.0)
    return update, 1.0


def adafactor_transport(state: dict, c: Tensor) -> None:
    if "exp_avg" in state:
        state["exp_avg"].copy_(c @ state["exp_avg"])
    if "exp_avg_sq_row" in state:  # the row statistic runs along the rank axis
        state["exp_avg_sq_row"].copy_(c.square() @ state["exp_avg_sq_row"])


# ---------------------------------------------------------------- Adam-mini (Zhang et al. 2024)
# One second moment per block instead of per element. Full-rank matrices: one v per
# output row (neuron). 1-D tensors: one v. Projected tensors: one v per column of
# R, shared across the rank axis; that mean is invariant to rotations inside the
# subspace, so it needs no transport.

def _mini_dims(x: Tensor, projected: bool):
    if x.dim() < 2:
        return tuple(range(x.dim()))
    return (-2,) if projected else tuple(range(1, x.dim()))  # projected: the rank axis, also in a bank


def adam_mini_init(x: Tensor, projected: bool, hp: dict) -> dict:
    dims = [d % x.dim() for d in _mini_dims(x, projected)]
    v_shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
    return {"exp_avg": torch.zeros_like(x), "v_block": x.new_zeros(v_shape), "v_over_rank_axis": projected}


def adam_mini_direction(x: Tensor, state: dict, hp: dict, n: int, reduce=None, keep=None):
    beta1, beta2 = hp["betas"]
    m, v = state["exp_avg"], state["v_block"]
    dims = _mini_dims(x, state["v_over_rank_axis"])
    m.mul_(unless_skipped(keep, beta1, 1.0)).add_(x, alpha=1.0 - beta1)
    block_sq = x.square().mean(dim=dims, keepdim=True) if dims else x.square()
    v.mul_(unless_skipped(keep, beta2, 1.0)).add_(block_sq, alpha=1.0 - beta2)
    direction = m / v.sqrt().add_(unless_skipped(keep, hp["eps"], math.inf))
    return direction, math.sqrt(1.0 - beta2**n) / (1.0 - beta1**n)


def adam_mini_transport(state: dict, c: Tensor) -> None:
    state["exp_avg"].copy_(c @ state["exp_avg"])


BASES = {
    "adamw": Base("adamw", adamw_init, adamw_direction, adamw_transport, elementwise=True),
    "adafactor": Base("adafactor", adafactor_init, adafactor_direction, adafactor_transport, elementwise=False),
    "adam_mini": Base("adam_mini", adam_mini_init, adam_mini_direction, adam_mini_transport, elementwise=False),
}


# ---------------------------------------------------------------- Fira residual (Chen et al. 2024)

FIRA_GROWTH_LIMIT = 1.01


def fira_scaling(r: Tensor, n: Tensor) -> Tensor:
    """Fira's norm ratio ||N_col|| / ||R_col||, one per column (norms along the rank axis)."""
    return n.norm(dim=-2) / (r.norm(dim=-2) + 1e-8)


def fira_residual(g: Tensor, back_r: Tensor, factor: Tensor, prev_norm: Tensor, reduce=lambda t: t,
                  keep=None) -> Tensor:
    """Fira's norm-based scaling of the gradient the subspace misses, with its norm-growth limiter.

    Follows the official code, which produced the published numbers: the residual
    is G - scale * B R (``back_r`` carries the scale), scaled by ``factor``
    (``fira_scaling``, broadcast along the rank axis), and if its norm grows by
    more than 1.01x since the last step it is cut back to 1.01x. ``prev_norm``
    (a 0-d tensor, +inf before the first step; [k] for a bank) is updated in place. Layout-agnostic:
    pass ``g`` and ``back_r`` in any one orientation with ``factor`` shaped to match. On a skipped
    step (``keep`` False, g zeroed) the residual is zero and the kept norm stays.
    """
    residual = (g - back_r).mul_(factor)
    norm = reduce(residual.square().sum(dim=(-2, -1))).sqrt()  # each whole matrix's norm, across TP shards
    limiter = torch.clamp(norm / (prev_norm + 1e-8), min=FIRA_GROWTH_LIMIT) / FIRA_GROWTH_LIMIT
    residual.div_(limiter[..., None, None])
    prev_norm.copy_(norm / limiter if keep is None else torch.where(keep, norm / limiter, prev_norm))
    return residual
