"""The step as functions of tensors and plain state dicts: what ``SaraOptimizer.step`` runs on a layout's slots.

One projected matrix, one step (the whole algorithm; ``projected_step`` runs it on a bank of k >= 1):

    if step % T == 0:  B = rule(G)                       # refresh: subspace.py on spectral.py's spectrum
    A = G or G^T;  R = B^T A                            # projector.py, canonical orientation
    N, c = base(R, moments)                             # updates.py: AdamW / Adafactor / Adam-mini
    D = scale * B N  (+ fira_residual(G, R, N))         # back in the weight's own layout
    W -= lr * c * D;  W -= lr * wd * W                  # decoupled decay after the step, as galore-torch

Every function reads the matrices' shard context (``layout.LocalContext`` or a tensor-parallel one) for what
crosses ranks: the spectrum at a refresh, sums over split rows or columns. ``keep`` is the step's finite flag
kept on the device (a 0-d bool), or None where the host already decided to step: see ``updates``.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from . import projector, subspace, updates

OSD_BASIS_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}
# GradScaler's non-finite kernel has no bf16 on CUDA ("not implemented for 'BFloat16'", seen on an H200)
AMP_CHECK_DTYPES = (torch.float16, torch.float32, torch.float64)
INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------- the step's finite flag


def flag_on_device(finite_flag, grads: list, owners_layout: str | None = None) -> bool:
    """``finite_flag``: 'device' / 'host' as given; None: on the device where the gradients are on a GPU.
    ``owners_layout`` names a layout whose ranks step different matrices (FSDP2's owners): there the host decides,
    since a rank owning no matrix due for a refresh would take the device path while its peers take the host's,
    and a non-finite gradient at that step would leave them in different collectives."""
    if owners_layout is not None:
        if finite_flag == "device":
            raise ValueError(
                f"sara_ds: finite_flag='device' needs every rank to step every matrix, but under {owners_layout} "
                "each whole matrix is stepped by its owner alone: a non-finite gradient at a step that refreshes on "
                "some ranks only would leave the ranks in different collectives. Use finite_flag=None (the host "
                "flag under this layout) or 'host'.")
        return False
    return bool(grads) and (finite_flag == "device" or (finite_flag is None and grads[0].is_cuda))


def nonfinite(grads: list, on_device: bool, exact: bool = False) -> Tensor:
    """1.0 where some gradient holds a NaN or Inf, else 0.0 (0-d float32, on the gradients' device), read nowhere.

    On the device: GradScaler's kernel (max |g| for bf16, which it lacks). For the host, the 2-norms (one foreach
    kernel, fast everywhere), which are finite unless an element is NaN or Inf or a finite one above ~1.8e19
    overflows its square; where they say so, ``exact`` tells the two apart with max |g| (ten times slower on a
    CPU)."""
    grads = [g for g in grads if g.numel()]  # an empty ZeRO fragment has no norm
    device = grads[0].device if grads else torch.device("cpu")
    found = torch.zeros((), dtype=torch.float32, device=device)
    if not grads:
        return found
    if not on_device:
        return _peaks_nonfinite(grads, float("inf") if exact else 2.0)
    one = torch.ones((), dtype=torch.float32, device=device)
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, same in by_dtype.items():  # the kernel takes one dtype at a time, as in GradScaler
        if dtype in AMP_CHECK_DTYPES:
            torch._amp_foreach_non_finite_check_and_unscale_(same, found, one)
        else:  # max |g| is NaN or Inf exactly where an element is, and cannot overflow
            found = torch.maximum(found, _peaks_nonfinite(same, float("inf")))
    return found


def _peaks_nonfinite(grads: list, order: float) -> Tensor:
    norms = torch._foreach_norm(grads, ord=order)  # NaN and Inf propagate
    return (~torch.isfinite(torch.stack([m.float() for m in norms])).all()).float()


def zero_unless(keep: Tensor, grads: list) -> None:
    """Zero every gradient in place where ``keep`` is False, and leave its bits where it is True: an integer
    multiply by 0 or 1 (a float one would keep NaN), one foreach kernel per element width and device."""
    by_width: dict = {}
    for g in grads:
        if g.numel():
            as_int = INT_OF_WIDTH[g.element_size()]
            by_width.setdefault(as_int, []).append(g.view(as_int))
    for as_int, same in by_width.items():
        torch._foreach_mul_(same, keep.to(as_int))


# ---------------------------------------------------------------- refresh


def init_projected(st: dict, local_shape, full_shape, left: bool, group: dict, index: int, name: str, device,
                   row_block=None) -> None:
    """A projected matrix's bookkeeping at its first step (its basis and moments come with the first refresh).
    ``row_block``: the (first, end, total) rows of it stepped here (a ZeRO-3 row block), kept with its state."""
    rows, cols = full_shape
    rank = group["rank"]
    if rank > min(rows, cols):
        warnings.warn(f"sara_ds: rank={rank} exceeds min(m, n)={min(rows, cols)} for {name} (shape "
                      f"{tuple(local_shape)}); using rank={min(rows, cols)} for this matrix", stacklevel=4)
        rank = min(rows, cols)
    st.update(matrix_id=index, step=0, base_step=0, left=left, rank=rank, refreshes=0, overlap=float("nan"))
    if group["residual"] == "fira":
        st["fira_norm"] = torch.full((), float("inf"), device=device)  # on the device, as the norms it meets
    if row_block is not None:
        st["row_block"] = list(row_block)


def refresh_due(st: dict, group: dict) -> bool:
    if "basis" not in st:
        return True
    return st["step"] % group["update_proj_gap"] == 0 and group["subspace"] != "online_pca"


def reads_spectrum(group: dict, st: dict) -> bool:
    """The spectral rules always; OSD and GrassWalk at their start; GoLore's and GrassJump's random draws never."""
    rule = group["subspace"]
    return rule != "random" and not (rule == "grass_walk" and "basis" in st)


def refresh(slots: list, states: list, group: dict, base, generators: list) -> None:
    """A new basis for each matrix of one batch (same group, shape, side, rank and context): one spectrum of the
    stack where the context takes one, one per matrix otherwise; singular values and overlaps read back once."""
    st, ctx = states[0], slots[0].context
    left, rank = st["left"], st["rank"]
    grads = [projector.as_matrix(slot.grad) for slot in slots]
    if not reads_spectrum(group, st):
        rows, cols = ctx.full_shape(grads[0].shape)  # the basis side of the whole matrix
        new = [_spectrum_free_basis(group, s, rows if left else cols, rank, gen, g)
               for s, g, gen in zip(states, grads, generators)]
    elif ctx.batched_spectrum and grads[0].dim() == 2:
        sigma, vectors = ctx.spectrum(torch.stack(normalised(grads, ctx)), left, None, rank)
        new = [_draw(group, s, v, rank, gen) for s, v, gen in zip(to_host(sigma), vectors, generators)]
    else:  # a context that forms the spectrum on one rank gives None elsewhere: those take its basis
        spectra = [ctx.spectrum(g, left, gen, rank) for g, gen in zip(normalised(grads, ctx), generators)]
        new = [None if sp is None else _draw(group, *sp, rank, gen) for sp, gen in zip(spectra, generators)]
    overlaps = [install_basis(s, b, g, group, base, ctx) for s, b, g in zip(states, new, grads)]
    if overlaps[0] is not None:
        for s, value in zip(states, to_host(torch.stack(overlaps)).tolist()):
            s["overlap"] = value


PEAK = 2.0**50  # above it, a gram's or sketch's squares summed over a matrix could overflow fp32


def normalised(grads: list, ctx) -> list:
    """The gradients a refresh decomposes, scaled by a power of two into a range where no spectrum's squares can
    overflow, when their largest entry (over every shard) exceeds ``PEAK``: exact, and the directions and the
    singular values' ratios, all a rule reads, are those of the gradient. Below it (any real training) they are
    the gradients themselves, so the refresh is bit for bit the unscaled one."""
    peak = ctx.reduce_max(torch.stack([g.detach().abs().amax() for g in grads]).amax().float().reshape(1))
    peak = float(peak)
    if peak <= PEAK:
        return grads
    scale = 2.0 ** -math.ceil(math.log2(peak))
    return [g.float() * scale for g in grads]


def _spectrum_free_basis(group, st, dim, rank, gen, grad) -> Tensor:
    if group["subspace"] == "random":
        return subspace.random_basis(dim, rank, gen, grad.float())
    return subspace.grassmann_walk(st["basis"], group["grass_walk_angle"], gen)


def _draw(group, sigma: Tensor, vectors: Tensor, rank: int, gen) -> Tensor:
    """The rule's r directions among the spectrum's (OSD and GrassWalk start from the dominant ones)."""
    rule = group["subspace"] if group["subspace"] in subspace.SPECTRAL_RULES else "dominant"
    idx = subspace.spectral_indices(rule, sigma, min(rank, sigma.shape[-1]), gen)
    return vectors[:, idx.to(vectors.device)].contiguous()


def install_basis(st: dict, new: Tensor, grad: Tensor, group: dict, base, context):
    """Sign-align and agree on the chosen basis, then make it the matrix's: fresh moments at the first refresh,
    the moment policy at later ones. Returns the overlap with the old basis (0-d, on the device), or None at the
    first refresh."""
    old = st.get("basis")
    if new is None:  # drawn on another rank (``TensorParallelContext``'s 'gather'): filled by ``synchronize``
        rows, cols = context.full_shape(grad.shape)
        new = torch.empty((rows if st["left"] else cols, st["rank"]), dtype=torch.float32, device=grad.device)
    elif group["basis_signs"] == "aligned":
        new = subspace.align_signs(new, old)
    new = context.synchronize(new)
    st["refreshes"] += 1
    if old is None:
        st["basis"] = new.contiguous()  # one layout for every rule (QR gives column-major): banks stack row-major
        fresh_moments(st, grad, group, base)
        if group["subspace"] == "online_pca":
            st["basis_exp_avg"] = torch.zeros_like(new)
            st["basis_exp_avg_sq"] = torch.zeros_like(new)
            st["basis_step"] = 0
        return None
    overlap = subspace.overlap(old, new)
    policy = group["moments_on_refresh"]
    if policy == "transport" and st["base_step"] > 0:
        base.transport(st, projector.change_of_basis(new, old))
    elif policy == "reset" and st["base_step"] > 0:
        fresh_moments(st, grad, group, base)
    old.copy_(new)
    return overlap


def fresh_moments(st: dict, grad: Tensor, group: dict, base) -> None:
    """Zeroed base-update state for R = B^T A, which is r x (A's columns as held here); bias correction restarts."""
    columns = grad.shape[1] if st["left"] else grad.shape[0]
    st.update(base.init(grad.new_zeros((st["basis"].shape[1], columns), dtype=torch.float32), True, group))
    st["base_step"] = 0


def to_host(t: Tensor) -> Tensor:
    """The refresh's reads back to the host, one per batch: a refresh may wait for the device, an ordinary step
    may not."""
    return t.detach().to(device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------- the projected step


def in_place(slot, group: dict) -> bool:
    """B N goes straight into the weight (``projector.add_back_projection_``): no m x n temporary, which for a bank
    of k large matrices would be k weights' worth. For 2-D fp32 weights (addmm_ takes one dtype) of at least
    ``in_place_min_numel`` elements, without Fira (whose residual is m x n anyway)."""
    return (group["residual"] != "fira" and slot.grad.dim() == 2 and slot.target.dtype == torch.float32
            and slot.grad.numel() >= group["in_place_min_numel"])


def projected_step(slots: list, states: list, state: dict, group: dict, base, keep=None) -> None:
    """One step of a bank of k >= 1 projected matrices: ``state`` holds their stacked tensors ([k, d, r] bases,
    [k, r, n] moments; ``banks``), ``states`` each one's own dict. Where A's rows are split over tensor-parallel
    ranks R is summed over them, where its columns are the base's statistics are."""
    for st in states:
        st["step"] += 1
        st["base_step"] += 1
    st, ctx = states[0], slots[0].context
    left = st["left"]
    basis = ctx.local_rows(state["basis"], left)
    stats = ctx.reduce_sum if ctx.columns_split(left) else None
    if in_place(slots[0], group):  # large matrices: no stack of their gradients either, only of the small R
        r = torch.stack([projector.project(projector.oriented(s.grad.float(), left), basis[i])
                         for i, s in enumerate(slots)])
        r, grad = (r if keep is None else r.where(keep, 0.0)), None
    else:
        grad = _stack([projector.as_matrix(s.grad) for s in slots]).float()
        grad = grad if keep is None else grad.where(keep, 0.0)
        r = projector.project(projector.oriented(grad, left), basis)
    if ctx.rows_split(left):
        r = ctx.reduce_sum(r)
    n, step_scale = base.direction(r, state, group, st["base_step"], stats, keep)
    step_size = group["lr"] * step_scale
    targets = [s.target for s in slots]
    if grad is None:
        for i, target in enumerate(targets):
            projector.add_back_projection_(target, n[i], basis[i], left, -step_size * group["scale"])
    else:
        update = projector.project_back_to_param(n, basis, left).mul_(group["scale"])
        if group["residual"] == "fira":
            back_r = projector.project_back_to_param(r, basis, left).mul_(group["scale"])
            factor = projector.rank_axis_factor(updates.fira_scaling(r, n), left)
            update += updates.fira_residual(grad, back_r, factor, state["fira_norm"], ctx.reduce_sum, keep)
        # the step is scaled, rounded, then added (no fused multiply-add): what a stepper's block holds where it
        # is zero-filled (``Slot.weights``) is then exactly what that piece's holder adds
        update.mul_(-step_size)
        steps = [u if u.shape == t.shape else u.reshape(t.shape)  # a conv kernel's, from its 2-D view
                 for u, t in zip(update.to(targets[0].dtype).unbind(0), targets)]
        torch._foreach_add_(targets, steps)
    decay(weights(slots), group, keep)
    if group["subspace"] == "online_pca":  # its own bank: the basis moves every step
        if grad is None:
            grad = slots[0].grad.float().unsqueeze(0)
            grad = grad if keep is None else grad.where(keep, 0.0)
        online_pca_step(st, projector.oriented(grad[0], left), group, ctx, keep)


def _stack(ts: list) -> Tensor:
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


def online_pca_step(st: dict, a: Tensor, group: dict, ctx, keep=None) -> None:
    """One Adam step on B for the online-PCA loss (OSD); its lr follows the weight schedule."""
    basis, left = st["basis"], st["left"]
    rows = (lambda b: ctx.local_rows(b, left), lambda t: ctx.gather_rows(t, left)) if ctx.rows_split(left) else None
    g = subspace.online_pca_gradient(basis, a, group["osd_orth_penalty"], ctx.reduce_sum, rows)
    if keep is not None:  # the orthogonality penalty is not zero when a is: a skipped step must not move B
        g = torch.where(keep, g, 0.0)
    st["basis_step"] += 1
    moments = {"exp_avg": st["basis_exp_avg"], "exp_avg_sq": st["basis_exp_avg_sq"]}
    direction, step_scale = updates.adamw_direction(g, moments, OSD_BASIS_ADAM, st["basis_step"], keep=keep)
    osd_lr = group["osd_lr"] if group["osd_lr"] is not None else 1.0 / group["update_proj_gap"]
    schedule = group["lr"] / group["lr_at_start"] if group["lr_at_start"] > 0 else 1.0
    basis.add_(direction, alpha=-osd_lr * schedule * step_scale)
    if st["basis_step"] % group["update_proj_gap"] == 0:
        anchor = st.get("basis_anchor")
        if anchor is not None:
            st["overlap"] = subspace.overlap(_orthonormal(anchor), _orthonormal(basis)).item()
            anchor.copy_(basis)
        else:
            st["basis_anchor"] = basis.clone()


def _orthonormal(b: Tensor) -> Tensor:
    return torch.linalg.qr(b).Q


# ---------------------------------------------------------------- the full-rank step


def full_rank_adamw(slots: list, states: list, group: dict, keep=None) -> None:
    """AdamW on whole gradients (or ZeRO fragments), in lists of one step count: torch's foreach kernels, or its
    fused kernel with ``fused`` for fp32 weights with fp32 gradients (the same update up to round-off)."""
    grads = [s.grad.float() for s in slots]  # one fp32 copy of a low-precision gradient
    for st, g in zip(states, grads):
        count_full_rank_step(st, g, group, updates.BASES["adamw"])
    for n in sorted({st["step"] for st in states}):
        same = [i for i, st in enumerate(states) if st["step"] == n]
        targets = [slots[i].target for i in same]
        moments = [states[i]["exp_avg"] for i in same], [states[i]["exp_avg_sq"] for i in same]
        if group["fused"] and all(slots[i].target.dtype == torch.float32 and grads[i] is slots[i].grad for i in same):
            updates.adamw_fused_(targets, [grads[i] for i in same], *moments, group, n, keep)
        else:
            directions, step_scale = updates.adamw_directions_foreach([grads[i] for i in same], *moments, group, n,
                                                                      keep)
            torch._foreach_add_(targets, [d.to(t.dtype) for d, t in zip(directions, targets)],
                                alpha=-group["lr"] * step_scale)
        decay(weights([slots[i] for i in same]), group, keep)


def full_rank_step(slot, st: dict, group: dict, base, name: str, keep=None) -> None:
    """A non-elementwise base (Adafactor, Adam-mini) on one whole gradient. A TP-split matrix that is not projected
    (a vocab-parallel lm_head, say) sums the statistics that span a row or column over its shards."""
    grad = slot.grad.float()
    split = slot.context.split_axis
    refuse_blocks_across_shards(name, split, base.name)
    transposed = split == 0 and base.name == "adafactor"  # symmetric: put the sharded axis on columns
    x = grad.mT if transposed else grad
    count_full_rank_step(st, x, group, base)
    direction, step_scale = base.direction(x, st, group, st["step"], slot.context.reduce_sum if split is not None
                                           else None, keep)
    direction.mul_(-group["lr"] * step_scale)  # rounded before it is added, as in ``projected_step``
    slot.target.add_((direction.mT if transposed else direction).to(slot.target.dtype))
    decay(weights([slot]), group, keep)


def refuse_blocks_across_shards(name: str, split_axis, base: str) -> None:
    """A full-rank matrix split over tensor-parallel ranks along its columns: Adam-mini's per-row blocks would span
    the shards. (Layouts whose ranks step different matrices call this when they place it, on every rank.)"""
    if split_axis == 1 and base == "adam_mini":
        raise ValueError(f"sara_ds: {name} is split over tensor-parallel ranks along its columns and is not "
                         "projected; Adam-mini's per-row blocks would span the shards. Project it (include it in "
                         "the projected group) or use SaraAdamW.")


def count_full_rank_step(st: dict, x: Tensor, group: dict, base) -> None:
    """Create a full-rank tensor's base state (shaped like ``x``) at its first step; count the step."""
    if "step" not in st:
        st["step"] = 0
        st.update(base.init(x, False, group))
    st["step"] += 1


# ---------------------------------------------------------------- decoupled weight decay


def decay(weights: list, group: dict, keep=None) -> None:
    """The decoupled decay after the step, as a multiply (no temporary; on a skipped step, by 1). Its one form is
    what lets a ZeRO or FSDP2 holder decay its own piece of a matrix stepped elsewhere bit for bit."""
    if group["weight_decay"] > 0:
        torch._foreach_mul_(weights, updates.unless_skipped(keep, 1.0 - group["lr"] * group["weight_decay"], 1.0))


def weights(slots: list) -> list:
    """What of the slots' targets holds weights, for the decay: a target, or a stepper's own pieces of it
    (``Slot.weights``)."""
    return [w for s in slots for w in ([s.target] if s.weights is None else s.weights)]


def state_numel(shape, projected: bool, left: bool, group: dict, base) -> int:
    """Elements of one matrix's optimizer state once stepped (basis and the base's moments, laid out on meta
    tensors): what ZeRO-3 balances across ranks."""
    if not projected:
        return _numel(base.init(torch.empty(shape, device="meta"), False, group))
    rows, cols = shape[0], math.prod(shape[1:])
    rank = min(group["rank"], rows, cols)
    moments = base.init(torch.empty((rank, cols if left else rows), device="meta"), True, group)
    basis = (rows if left else cols) * rank
    online_pca = 3 * basis if group["subspace"] == "online_pca" else 0  # the basis's Adam moments, its anchor
    return basis + _numel(moments) + online_pca + (group["residual"] == "fira")  # Fira's 0-d norm


def _numel(state: dict) -> int:
    return sum(t.numel() for t in state.values() if isinstance(t, Tensor))
