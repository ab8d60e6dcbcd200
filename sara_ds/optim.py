"""SaraAdamW, SaraAdafactor, SaraAdamMini: thin bookkeeping around the pure functions.

One projected matrix, one step (the whole algorithm):

    if step % T == 0:  B = rule(G)                       # subspace.py, every T steps
    A = G or G^T;  R = B^T A                            # projector.py, canonical orientation
    N, c = base(R, moments)                             # updates.py: AdamW / Adafactor / Adam-mini
    D = scale * B N  (+ fira_residual(G, R, N))         # back in the weight's own layout
    W -= lr * c * D;  W -= lr * wd * W                  # decoupled decay after the step, as galore-torch

Groups that carry ``rank`` are projected (galore-torch's convention); other
parameters get the base update at full rank. Where the gradient of a matrix
comes from (a plain parameter, fp32 master copies, a ZeRO flat partition) and
who else holds part of it (tensor parallelism) is the business of
``sara_ds.sharding``; this module only sees ``Slot``s and their shard contexts.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import banks, projector, subspace, updates
from .config import IN_PLACE_MIN_NUMEL, PROJECTION_DEFAULTS, SubspaceOptions, validate_group
from .sharding import Slot, shape_of
from .sharding.placement import Placement

_OSD_BASIS_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}
# GradScaler's non-finite kernel has no bf16 on CUDA ("not implemented for 'BFloat16'", seen on an H200)
_AMP_CHECK_DTYPES = (torch.float16, torch.float32, torch.float64)


class SaraOptimizer(torch.optim.Optimizer):
    """One implementation for every base: ``base`` ('adamw', 'adafactor', 'adam_mini'), its
    hyperparameters, and the subspace switches. Use the public names below, which fix the base
    and document its defaults."""

    def __init__(self, params, base: str, base_defaults: dict, options: SubspaceOptions = SubspaceOptions(),
                 tp_group=None):
        defaults = dict(base_defaults, **options.group_defaults(), **PROJECTION_DEFAULTS)
        super().__init__(params, defaults)
        self.base = updates.BASES[base]
        # Stable matrix ids: position in the parameter order given at construction.
        # Engines (ZeRO, mixed-precision wrappers) later swap group['params'] for
        # other tensors; these originals are how their 2-D structure is recovered.
        self.original_params: list[Tensor] = []
        self.param_names: list[str] = []
        self.group_members: list[list[int]] = []
        for gi, group in enumerate(self.param_groups):
            validate_group(group, self.base_name, gi)
            group["sara_group"] = gi
            group.setdefault("lr_at_start", group["lr"])
            group.setdefault("skipped_steps", 0)  # whole steps skipped on a non-finite gradient (checkpointed)
            names = group.get("param_names") or [None] * len(group["params"])
            members = []
            for p, name in zip(group["params"], names):
                members.append(len(self.original_params))
                self.param_names.append(name or f"param{len(self.original_params)}")
                self.original_params.append(p)
            self.group_members.append(members)
        flags = {group.get("finite_flag") for group in self.param_groups}
        if len(flags) > 1:  # one flag decides the whole step
            raise ValueError(f"sara_ds: finite_flag must be the same in every param group, got {sorted(map(str, flags))}")
        # tp_group: the process group TP-split weights are split over (not saved: not a hyperparameter)
        self.placement = Placement(self.original_params, tp_group)
        self.banks = banks.Banks()
        self._pending_skips = None  # steps skipped by the device flag, not yet added to skipped_steps

    @property
    def tp_group(self):
        return self.placement.tp_group

    @property
    def base_name(self) -> str:
        return self.base.name

    # ------------------------------------------------------------ bookkeeping

    def state_dict(self):
        self._count_device_skips()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._keep_saved_dtypes(state_dict)
        self.placement.clear()
        self.banks.clear()
        self._pending_skips = None

    def _count_device_skips(self) -> None:
        """Add the steps the device flag skipped to each group's ``skipped_steps`` (reads one number back:
        done when the count is asked for or saved, never in a step)."""
        if self._pending_skips is not None:
            skipped = int(self._pending_skips.item())
            self._pending_skips = None
            for group in self.param_groups:
                group["skipped_steps"] = group.get("skipped_steps", 0) + skipped

    def _keep_saved_dtypes(self, state_dict) -> None:
        """Undo torch's cast of floating-point state to the parameter's dtype.

        ``Optimizer.load_state_dict`` assumes state has the parameter's dtype. Ours is
        fp32 by design (bases, moments, Fira's norm) whatever the weights are, so a bf16
        or fp16 model would come back with a bf16 basis: lossy, and the next matmul
        with the fp32 gradient fails. Take every tensor as it was saved.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                _restore_dtypes(self.state[p], state_dict["state"][saved_id])

    def _slots(self, group) -> list[Slot]:
        return self.placement.slots(group, self.group_members[group["sara_group"]], self.state,
                                    needs_full=lambda i: self._needs_full_matrix(group, i),
                                    state_numel=lambda i: self._state_numel(group, i))

    def _projected(self, group, index) -> bool:
        return "rank" in group and len(shape_of(self.original_params[index])) >= 2

    def _state_numel(self, group, index) -> int:
        """Elements of one matrix's optimizer state once it is stepped whole (basis and the base's moments, laid
        out on meta tensors): what ZeRO-3 balances across ranks."""
        shape = shape_of(self.original_params[index])
        if not self._projected(group, index):
            return _numel(self.base.init(torch.empty(shape, device="meta"), False, group))
        rows, cols = shape[0], shape[1:].numel()
        left = self.placement.basis_on_left(index, rows, cols, group["proj_type"])
        rank = min(group["rank"], rows, cols)
        moments = self.base.init(torch.empty((rank, cols if left else rows), device="meta"), True, group)
        basis = (rows if left else cols) * rank
        online_pca = 3 * basis if group["subspace"] == "online_pca" else 0  # the basis's Adam moments, its anchor
        return basis + _numel(moments) + online_pca + (group["residual"] == "fira")  # Fira's 0-d norm

    def _needs_full_matrix(self, group, index) -> bool:
        return self._projected(group, index) or not self.base.elementwise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, slot) for group in self.param_groups for slot in self._slots(group) if slot.grad is not None]
        grads = [slot.grad for _, slot in work]
        keep = None  # the step's finite flag, where it stays on the device
        if self._flag_on_device(grads) and not any(self._creates_or_refreshes(group, slot) for group, slot in work):
            keep = self._device_finite_flag(grads)
        elif not self._step_is_finite(grads):
            for group in self.param_groups:  # as GradScaler and DeepSpeed's overflow check: nothing moves
                group["skipped_steps"] = group.get("skipped_steps", 0) + 1
            self.placement.finish()
            return loss
        self._refresh_where_due([(group, slot) for group, slot in work
                                 if not slot.fragment and self._projected(group, slot.index)])
        singles, batched, bank_steps = self._plan(work)
        if keep is not None:  # a bank masks its own stacked gradient (one op, not one per matrix)
            _zero_unless(keep, [slot.grad for _, slot, _ in singles]
                         + [slot.grad for _, slots in batched for slot in slots])
        for group, slot, step in singles:
            step(slot, group, keep)
        for group, slots in batched:
            self._full_rank_adamw_foreach(slots, group, keep)
        for group, slots in bank_steps:
            self._projected_bank_step(slots, group, keep)
        self.placement.finish()
        return loss

    def _plan(self, work):
        """How this step's tensors are stepped: ``singles`` one at a time (group, slot, its step function);
        ``batched``, a group's full-rank AdamW tensors through foreach (or fused) kernels; ``bank_steps``, the
        same-shape projected matrices stepped as one (``sara_ds.banks``)."""
        singles, batched, banked = [], {}, {}
        for group, slot in work:
            if not slot.fragment and self._projected(group, slot.index):
                key = self._bank_key(slot, group)
                if key is None:
                    singles.append((group, slot, self._projected_step))
                else:
                    banked.setdefault(key, (group, []))[1].append(slot)
            elif self.base.name == "adamw" and (_batched(group, slot.grad) or group["fused"]):
                batched.setdefault(id(group), (group, []))[1].append(slot)
            else:
                singles.append((group, slot, self._full_rank_step))
        bank_steps = []
        for group, slots in banked.values():
            if len(slots) > 1 and banks.stackable([slot.state for slot in slots]):
                bank_steps.append((group, slots))
            else:
                singles += [(group, slot, self._projected_step) for slot in slots]
        return singles, list(batched.values()), bank_steps

    def _flag_on_device(self, grads) -> bool:
        """``finite_flag``: 'device' / 'host' as given; None: on the device where the gradients are on a GPU."""
        flag = self.param_groups[0].get("finite_flag") if self.param_groups else "host"
        return bool(grads) and (flag == "device" or (flag is None and grads[0].is_cuda))

    def _creates_or_refreshes(self, group, slot: Slot) -> bool:
        """Steps that create state or refresh a basis decide on the host: an SVD of a NaN gradient must not
        happen, and a first step has no state to leave unchanged."""
        st = slot.state
        if not slot.fragment and self._projected(group, slot.index):
            return self._refresh_due(st, group)
        return "step" not in st

    def _device_finite_flag(self, grads) -> Tensor:
        """The step's finite flag as a 0-d bool tensor that never leaves the device (agreed by every rank that
        holds another part of the step, in one small all-reduce), found with the kernel GradScaler uses. Where it
        is False the step zeroes the gradients it reads (``_zero_unless``; a bank, its stack), so what it computes
        from them stays finite and the rules' ``keep`` masks (``updates``) leave weights and state as they were.
        The step counts still advance: see ``finite_flag``."""
        device = grads[0].device  # one device per optimizer, as the host flag's torch.stack of norms assumes
        found = torch.zeros((), dtype=torch.float32, device=device)
        one = torch.ones((), dtype=torch.float32, device=device)
        by_dtype: dict = {}
        for g in grads:
            if g.numel():
                by_dtype.setdefault(g.dtype, []).append(g)
        for dtype, same in by_dtype.items():  # the kernel takes one dtype at a time, as in GradScaler
            if dtype in _AMP_CHECK_DTYPES:
                torch._amp_foreach_non_finite_check_and_unscale_(same, found, one)
            else:  # max |g| is NaN or Inf exactly where an element is, and cannot overflow
                peaks = torch.stack(torch._foreach_norm(same, ord=float("inf"))).float()
                found = torch.maximum(found, (~torch.isfinite(peaks).all()).float())
        keep = ~self.placement.any_rank(found).to(device)
        skipped = (~keep).float()
        self._pending_skips = skipped if self._pending_skips is None else self._pending_skips.add_(skipped)
        return keep

    def _step_is_finite(self, grads) -> bool:
        """One flag for the whole step, agreed by every rank that holds another part of it
        (``Placement.any_rank``): a rank that stepped alone would desynchronise weights and the
        next refresh. One host sync per step.

        The 2-norm of every gradient (one foreach kernel, fast everywhere) is finite unless an element
        is NaN or Inf, or a finite one above ~1.8e19 overflows its square. Only when it is not are the
        max |g| (exact, but ten times slower on a CPU) consulted, to tell those apart."""
        grads = [g for g in grads if g.numel()]  # an empty ZeRO fragment has no norm
        return not (self._any_rank_nonfinite(grads, 2.0) and self._any_rank_nonfinite(grads, float("inf")))

    def _any_rank_nonfinite(self, grads, order: float) -> bool:
        bad = torch.zeros((), dtype=torch.float32)
        if grads:
            norms = torch._foreach_norm(grads, ord=order)  # NaN and Inf propagate
            bad = (~torch.isfinite(torch.stack([m.float() for m in norms])).all()).float()
        return bool(self.placement.any_rank(bad))

    # ------------------------------------------------------------ updates

    def _apply(self, slot: Slot, delta: Tensor, step_size: float, group, keep=None) -> None:
        target = slot.target
        target.add_(delta.to(target.dtype), alpha=-step_size)
        self._decay_all([target], group, keep)

    @staticmethod
    def _decay_all(targets: list, group, keep=None) -> None:
        if group["weight_decay"] > 0:  # W * 1 is W: where the step is taken, the same decay bit for bit
            decayed = targets if keep is None else torch._foreach_mul(targets, keep)
            torch._foreach_add_(targets, decayed, alpha=-group["lr"] * group["weight_decay"])

    def _full_rank_step(self, slot: Slot, group, keep=None) -> None:
        st = slot.state
        grad = slot.grad.float()
        # A TP-split matrix that is not projected (a vocab-parallel lm_head under AutoTP, say): the bases
        # whose statistics span a row or column sum over the TP group along the sharded axis.
        split = slot.context.partition_dim if not self.base.elementwise else None
        if split is not None and self.base.name == "adam_mini" and split == 1:
            raise ValueError(f"sara_ds: {self.param_names[slot.index]} is split over tensor-parallel ranks along its "
                             "columns and is not projected; Adam-mini's per-row blocks would span the shards. Project "
                             "it (include it in the projected group) or use SaraAdamW.")
        transposed = split == 0 and self.base.name == "adafactor"  # symmetric: put the sharded axis on columns
        x = grad.mT if transposed else grad
        reduce = slot.context.reduce_sum if split is not None else None
        self._count_full_rank_step(st, x, group)
        direction, step_scale = self.base.direction(x, st, group, st["step"], reduce, keep)
        self._apply(slot, direction.mT if transposed else direction, group["lr"] * step_scale, group, keep)

    def _count_full_rank_step(self, st: dict, x: Tensor, group) -> None:
        """Create a full-rank tensor's base state (shaped like ``x``) at its first step; count the step."""
        if "step" not in st:
            st["step"] = 0
            st.update(self.base.init(x, False, group))
        st["step"] += 1

    def _full_rank_adamw_foreach(self, slots: list, group, keep=None) -> None:
        """``_full_rank_step`` for AdamW, over a group's full-rank tensors at once (one set of foreach
        kernels per step count; all share one unless some parameter missed a step)."""
        grads = {id(slot): slot.grad.float() for slot in slots}  # one fp32 copy of a low-precision gradient
        for slot in slots:
            self._count_full_rank_step(slot.state, grads[id(slot)], group)
        for n in sorted({slot.state["step"] for slot in slots}):
            same = [slot for slot in slots if slot.state["step"] == n]
            targets = [slot.target for slot in same]
            if group["fused"] and all(t.dtype == torch.float32 and grads[id(s)] is s.grad for t, s in zip(targets, same)):
                # torch's kernel takes params, grads and moments of one dtype: fp32 weights (or ZeRO's fp32
                # master copies) with fp32 gradients. Others take the foreach path: the same update.
                updates.adamw_fused_(targets, [slot.grad for slot in same], [slot.state["exp_avg"] for slot in same],
                                     [slot.state["exp_avg_sq"] for slot in same], group, n, keep)
                self._decay_all(targets, group, keep)
                continue
            directions, step_scale = updates.adamw_directions_foreach(
                [grads[id(slot)] for slot in same], [slot.state["exp_avg"] for slot in same],
                [slot.state["exp_avg_sq"] for slot in same], group, n, keep)
            directions = [d.to(t.dtype) for d, t in zip(directions, targets)]
            torch._foreach_add_(targets, directions, alpha=-group["lr"] * step_scale)
            self._decay_all(targets, group, keep)

    def _refresh_where_due(self, projected: list) -> None:
        """State at a matrix's first step, and the refreshes that are due: eager. Same-shape matrices held whole
        whose rule reads a spectrum take one batched SVD (or gram-eigh) and read their singular values and overlaps
        back once per batch (``_refresh_batch``); the rest, per matrix (``_refresh``)."""
        batches = {}
        for group, slot in projected:
            st = slot.state
            if "basis" not in st:
                self._init_matrix_state(st, projector.as_matrix(slot.grad), group, slot.index, slot.context)
            if not self._refresh_due(st, group):
                continue
            if (self._reads_spectrum(group, st) and slot.grad.dim() == 2 and _batched(group, slot.grad)
                    and slot.context.batched_spectrum):
                key = (id(group), tuple(slot.grad.shape), slot.grad.dtype, slot.grad.device, st["left"], st["rank"],
                       slot.context.bank_key)
                batches.setdefault(key, (group, []))[1].append(slot)
            else:
                self._refresh(st, projector.as_matrix(slot.grad), group, slot)
        for group, slots in batches.values():
            self._refresh_batch(slots, group)

    @staticmethod
    def _reads_spectrum(group, st) -> bool:
        """The refresh draws from the gradient's spectrum (``_choose_basis``): the spectral rules always; OSD and
        GrassWalk at their start; GoLore's and GrassJump's random draws never."""
        rule = group["subspace"]
        return rule != "random" and not (rule == "grass_walk" and "basis" in st)

    def _refresh_batch(self, slots: list, group) -> None:
        """``_refresh`` for same-shape matrices with a spectral rule (or at their first refresh), the same choice
        per matrix: one batched spectrum, singular values read back once, overlaps read back once."""
        st = slots[0].state
        sigma, vectors = slots[0].context.spectrum(torch.stack([slot.grad for slot in slots]), st["left"], None,
                                                   st["rank"])
        sigma_host = _to_host(sigma)
        overlaps = []
        for i, slot in enumerate(slots):
            new = _draw_from_spectrum(group, sigma_host[i], vectors[i], st["rank"], _refresh_generator(group, slot))
            overlaps.append(self._install_basis(slot.state, new, slot.grad, group, slot))
        if overlaps[0] is not None:
            for slot, value in zip(slots, _to_host(torch.stack(overlaps)).tolist()):
                slot.state["overlap"] = value

    def _bank_key(self, slot: Slot, group):
        """What matrices must share to be stepped as one; None keeps a matrix on the per-matrix path
        (``foreach`` off, OSD's per-step basis update, >2-D weights)."""
        st = slot.state
        if not _batched(group, slot.grad) or group["subspace"] == "online_pca" or slot.grad.dim() != 2:
            return None
        return (id(group), tuple(slot.grad.shape), slot.grad.dtype, slot.grad.device, slot.target.dtype,
                st["left"], st["rank"], st["base_step"], slot.context.bank_key)

    def _projected_bank_step(self, slots: list, group, keep=None) -> None:
        """``_projected_step`` for a bank: the same functions on [k, ...] stacks, the same arithmetic."""
        bank = self.banks.bank_for([slot.state for slot in slots])
        for slot in slots:
            slot.state["step"] += 1
            slot.state["base_step"] += 1
        st, state = slots[0].state, bank.state
        basis, left, reduce = state["basis"], st["left"], slots[0].context.reduce_sum
        in_place = self._in_place(slots[0], group)  # a bank shares group, shape and dtype: all of it or none
        if in_place:  # large matrices: no stack of their gradients either, only of the small R
            r = torch.stack([projector.project(projector.oriented(slot.grad.float(), left), basis[i])
                             for i, slot in enumerate(slots)])
            r = r if keep is None else r.where(keep, 0.0)
        else:
            grad = torch.stack([slot.grad for slot in slots]).float()
            grad = grad if keep is None else grad.where(keep, 0.0)
            r = projector.project(projector.oriented(grad, left), basis)
        n, step_scale = self.base.direction(r, state, group, st["base_step"], reduce, keep)
        step_size = group["lr"] * step_scale
        if in_place:
            for i, slot in enumerate(slots):
                projector.add_back_projection_(slot.target, n[i], basis[i], left, -step_size * group["scale"])
            self._decay_in_place([slot.target for slot in slots], group, keep)
            return
        update = projector.project_back_to_param(n, basis, left).mul_(group["scale"])
        if group["residual"] == "fira":
            back_r = projector.project_back_to_param(r, basis, left).mul_(group["scale"])
            factor = projector.rank_axis_factor(updates.fira_scaling(r, n), left)
            update += updates.fira_residual(grad, back_r, factor, state["fira_norm"], reduce, keep)
        targets = [slot.target for slot in slots]
        torch._foreach_add_(targets, list(update.to(targets[0].dtype).unbind(0)), alpha=-step_size)
        self._decay_all(targets, group, keep)

    def _projected_step(self, slot: Slot, group, keep=None) -> None:
        st = slot.state
        grad = projector.as_matrix(slot.grad)
        basis, left = st["basis"], st["left"]
        a = projector.oriented(grad.float(), left)
        r = projector.project(a, basis)
        st["step"] += 1
        st["base_step"] += 1
        reduce = slot.context.reduce_sum
        n, step_scale = self.base.direction(r, st, group, st["base_step"], reduce, keep)
        if self._in_place(slot, group):
            alpha = -group["lr"] * step_scale * group["scale"]
            projector.add_back_projection_(slot.target, n, basis, left, alpha)
            self._decay_in_place([slot.target], group, keep)
        else:
            update = projector.project_back_to_param(n, basis, left).mul_(group["scale"])
            if group["residual"] == "fira":
                back_r = projector.project_back_to_param(r, basis, left).mul_(group["scale"])
                factor = projector.rank_axis_factor(updates.fira_scaling(r, n), left)
                update += updates.fira_residual(grad.float(), back_r, factor, st["fira_norm"], reduce, keep)
            self._apply(slot, update.reshape(slot.grad.shape), group["lr"] * step_scale, group, keep)
        if group["subspace"] == "online_pca":
            self._online_pca_step(st, a, group, reduce, keep)

    @staticmethod
    def _in_place(slot: Slot, group) -> bool:
        """B N goes straight into the weight (``projector.add_back_projection_``): no m x n temporary, which for
        a bank of k large matrices would be k weights' worth. For 2-D fp32 weights (addmm_ takes one dtype) of at
        least ``in_place_min_numel`` elements, without Fira (whose residual is m x n anyway)."""
        return (group["residual"] != "fira" and slot.grad.dim() == 2 and slot.target.dtype == torch.float32
                and slot.grad.numel() >= group.get("in_place_min_numel", IN_PLACE_MIN_NUMEL))

    @staticmethod
    def _decay_in_place(targets: list, group, keep=None) -> None:
        """The decoupled decay after an in-place step, as a multiply (no temporary; on a skipped step, by 1)."""
        if group["weight_decay"] > 0:
            torch._foreach_mul_(targets, updates.unless_skipped(keep, 1.0 - group["lr"] * group["weight_decay"], 1.0))

    def _init_matrix_state(self, st: dict, grad: Tensor, group, index: int, context) -> None:
        rows, cols = context.full_shape(grad.shape)
        left = self.placement.basis_on_left(index, rows, cols, group["proj_type"])
        rank = group["rank"]
        if rank > min(rows, cols):
            warnings.warn(
                f"sara_ds: rank={rank} exceeds min(m, n)={min(rows, cols)} for {self.param_names[index]} "
                f"(shape {tuple(grad.shape)}); using rank={min(rows, cols)} for this matrix",
                stacklevel=3,
            )
            rank = min(rows, cols)
        st.update(matrix_id=index, step=0, base_step=0, left=left, rank=rank, refreshes=0, overlap=float("nan"))
        if group["residual"] == "fira":
            st["fira_norm"] = torch.full((), float("inf"), device=grad.device)  # on the device, as the norms it meets

    def _refresh_due(self, st, group) -> bool:
        if "basis" not in st:
            return True
        return st["step"] % group["update_proj_gap"] == 0 and group["subspace"] != "online_pca"

    def _refresh(self, st: dict, grad: Tensor, group, slot: Slot) -> None:
        new = self._choose_basis(group, grad, st, st.get("basis"), _refresh_generator(group, slot), slot)
        overlap = self._install_basis(st, new, grad, group, slot)
        if overlap is not None:
            st["overlap"] = overlap.item()

    def _install_basis(self, st: dict, new: Tensor, grad: Tensor, group, slot: Slot):
        """Sign-align and agree on the chosen basis, then make it the matrix's: fresh moments at the first
        refresh, the moment policy at later ones. Returns the overlap with the old basis (0-d, on the device),
        or None at the first refresh."""
        old = st.get("basis")
        if group["basis_signs"] == "aligned":
            new = subspace.align_signs(new, old)
        new = slot.context.synchronize(new)
        st["refreshes"] += 1
        if old is None:
            st["basis"] = new.contiguous()  # one layout for every rule (QR gives column-major): banks stack row-major
            self._fresh_moments(st, grad, group)
            if group["subspace"] == "online_pca":
                st["basis_exp_avg"] = torch.zeros_like(new)
                st["basis_exp_avg_sq"] = torch.zeros_like(new)
                st["basis_step"] = 0
            return None
        overlap = subspace.overlap(old, new)
        policy = group["moments_on_refresh"]
        if policy == "transport" and st["base_step"] > 0:
            self.base.transport(st, projector.change_of_basis(new, old))
        elif policy == "reset" and st["base_step"] > 0:
            self._fresh_moments(st, grad, group)
        old.copy_(new)
        return overlap

    def _fresh_moments(self, st: dict, grad: Tensor, group) -> None:
        """Zeroed base-update state for R = B^T A, which is r x (A's columns); its bias correction restarts."""
        columns = grad.shape[1] if st["left"] else grad.shape[0]
        st.update(self.base.init(grad.new_zeros((st["basis"].shape[1], columns), dtype=torch.float32), True, group))
        st["base_step"] = 0

    def _choose_basis(self, group, grad, st, old, gen, slot: Slot) -> Tensor:
        rank, left = st["rank"], st["left"]
        if not self._reads_spectrum(group, st):
            if group["subspace"] == "random":
                return subspace.random_basis(grad.shape[0] if left else grad.shape[1], rank, gen, grad.float())
            return subspace.grassmann_walk(old, group["grass_walk_angle"], gen)
        sigma, vectors = slot.context.spectrum(grad, left, gen, rank)
        return _draw_from_spectrum(group, sigma, vectors, rank, gen)

    def _online_pca_step(self, st: dict, a: Tensor, group, reduce, keep=None) -> None:
        """One Adam step on B for the online-PCA loss (OSD); lr follows the weight schedule."""
        basis = st["basis"]
        g = subspace.online_pca_gradient(basis, a, group["osd_orth_penalty"], reduce)
        if keep is not None:  # the orthogonality penalty is not zero when a is: a skipped step must not move B
            g = torch.where(keep, g, 0.0)
        st["basis_step"] += 1
        moments = {"exp_avg": st["basis_exp_avg"], "exp_avg_sq": st["basis_exp_avg_sq"]}
        direction, step_scale = updates.adamw_direction(g, moments, _OSD_BASIS_ADAM, st["basis_step"], keep=keep)
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

    # ------------------------------------------------------------ metrics

    def matrix_states(self):
        """(matrix id, per-matrix state) for every projected matrix this process holds state for."""
        for st in self.state.values():
            if "basis" in st:
                yield st["matrix_id"], st
            else:  # a ZeRO flat partition: {matrix id: state}
                for sub in st.values():
                    if isinstance(sub, dict) and "basis" in sub:
                        yield sub["matrix_id"], sub

    def subspace_overlaps(self) -> dict:
        """name -> ||B_old^T B_new||_F^2 / r at the latest refresh (NaN before the second one)."""
        return {self.param_names[i]: st["overlap"] for i, st in self.matrix_states()}

    def refresh_counts(self) -> dict:
        """``refreshes``: subspace refreshes of the matrices held here, summed.
        ``skipped_steps``: whole steps skipped because some gradient (anywhere in the
        step, on any rank that holds part of it) was NaN or Inf."""
        self._count_device_skips()
        return {"refreshes": sum(st["refreshes"] for _, st in self.matrix_states()),
                "skipped_steps": max((g.get("skipped_steps", 0) for g in self.param_groups), default=0)}

    def tp_bytes_sent(self) -> int:
        """Bytes this process has put into tensor-parallel collectives at subspace refreshes."""
        return self.placement.tp_bytes_sent()

    def zero_bytes_sent(self) -> int:
        """Bytes this process has sent to and from the steppers of ZeRO straddlers (every matrix at ZeRO-3)."""
        return self.placement.zero_bytes_sent()

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state on this process."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.state))


def _numel(state: dict) -> int:
    return sum(t.numel() for t in state.values() if isinstance(t, Tensor))


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _refresh_generator(group, slot: Slot) -> torch.Generator:
    return subspace.refresh_generator(group["seed"], slot.index, slot.state["step"] // group["update_proj_gap"])


def _draw_from_spectrum(group, sigma: Tensor, vectors: Tensor, rank: int, gen) -> Tensor:
    """The rule's r directions among the spectrum's (OSD and GrassWalk start from the dominant ones)."""
    rule = group["subspace"] if group["subspace"] in subspace.SPECTRAL_RULES else "dominant"
    idx = subspace.spectral_indices(rule, sigma, min(rank, sigma.shape[-1]), gen)
    return vectors[:, idx.to(vectors.device)].contiguous()


def _to_host(t: Tensor) -> Tensor:
    """The refresh's reads back to the host, one per batch: a refresh may wait for the device, a bank's
    ordinary step may not."""
    return t.detach().to(device="cpu", dtype=torch.float32)


def _zero_unless(keep: Tensor, grads: list) -> None:
    """Zero every gradient in place where ``keep`` is False, and leave its bits where it is True: an integer
    multiply by 0 or 1 (a float one would keep NaN), one foreach kernel per element width and device."""
    by_width: dict = {}
    for g in grads:
        if g.numel():
            as_int = _INT_OF_WIDTH[g.element_size()]
            by_width.setdefault(as_int, []).append(g.view(as_int))
    for as_int, same in by_width.items():
        torch._foreach_mul_(same, keep.to(as_int))


def _batched(group, grad: Tensor) -> bool:
    """``foreach``: True / False as given; None as torch's optimizers decide, batched on a GPU only."""
    foreach = group.get("foreach")
    return grad.is_cuda if foreach is None else foreach


def _restore_dtypes(loaded: dict, saved: dict) -> None:
    for key, value in loaded.items():
        kept = saved.get(key)
        if isinstance(value, dict) and isinstance(kept, dict):
            _restore_dtypes(value, kept)
        elif isinstance(value, Tensor) and isinstance(kept, Tensor) and kept.dtype != value.dtype:
            loaded[key] = kept.to(device=value.device, copy=True)


def _orthonormal(b: Tensor) -> Tensor:
    return torch.linalg.qr(b).Q


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _pair(betas):
    return tuple(betas) if isinstance(betas, (list, tuple)) else betas


class SaraAdamW(SaraOptimizer):
    """Low-rank AdamW with importance-sampled subspaces (SARA) and the rules it is compared with.

    Drop-in for galore-torch's ``GaLoreAdamW``: groups with ``rank`` (and
    ``update_proj_gap``, ``scale``, ``proj_type``) are projected. ``preset`` picks a
    paper's switches (see ``sara_ds.config.PRESETS``); ``subspace``, ``residual``
    and ``moments_on_refresh`` set them one by one; the other keyword options are
    ``sara_ds.config.SubspaceOptions``'s. For Megatron tensor-parallel weights pass
    ``tp_group``; ``tp_spectrum`` ('tsqr', 'gram' or 'sketch') says how the full
    matrix's spectrum is formed from the shards at a refresh, and ``spectrum`` ('svd',
    default, 'gram' or 'sketch') how it is formed for a matrix held whole.
    ``basis_signs='aligned'`` (default) fixes singular-vector signs so that kept
    moments mean the same thing however the SVD was computed (1 process, TP, any
    LAPACK); ``'lapack'`` keeps LAPACK's signs, which is what galore-torch does
    and reproduces it bit for bit on one process. ``foreach=True`` steps the projected
    matrices of one shape as one bank (``sara_ds.banks``) and the full-rank parameters of
    a group with torch's foreach kernels; ``False`` steps them one by one (the same
    arithmetic, bit for bit); ``None`` (default) follows torch's rule: batched where the
    gradients are on a GPU, one by one on a CPU (where batching measured slower).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True, *,
                 tp_group=None, **options):
        base = dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, "adamw", base, SubspaceOptions.from_kwargs("SaraAdamW", options), tp_group)


class SaraAdafactor(SaraOptimizer):
    """Low-rank Adafactor (factored second moment on the projected matrix), as GaLore-Adafactor.

    Defaults follow the GaLore scripts: no first moment (``beta1=None``),
    ``decay_rate=-0.8``, ``eps=1e-30``, ``clip_threshold=1.0``, explicit ``lr``.
    Keyword options as ``SaraAdamW``'s.
    """

    def __init__(self, params, lr=1e-2, beta1=None, decay_rate=-0.8, eps=1e-30, clip_threshold=1.0, weight_decay=0.0,
                 *, tp_group=None, **options):
        base = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps, clip_threshold=clip_threshold,
                    weight_decay=weight_decay)
        super().__init__(params, "adafactor", base, SubspaceOptions.from_kwargs("SaraAdafactor", options), tp_group)


class SaraAdamMini(SaraOptimizer):
    """Low-rank Adam-mini: one second moment per block (per output row; per column of R when projected).
    Keyword options as ``SaraAdamW``'s."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, tp_group=None, **options):
        base = dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, "adam_mini", base, SubspaceOptions.from_kwargs("SaraAdamMini", options), tp_group)


OPTIMIZERS = {"SaraAdamW": SaraAdamW, "SaraAdafactor": SaraAdafactor, "SaraAdamMini": SaraAdamMini}
