"""SaraAdamW, SaraAdafactor, SaraAdamMini: thin bookkeeping around ``functional``'s step.

Groups that carry ``rank`` are projected (galore-torch's convention); other parameters get the base update at
full rank. The optimizer knows its matrices by a stable id (their position in the parameter order it was
built with) and keeps each one's state under that id. Where their gradients and weights are, and who else
holds part of them, is its ``layout``'s business (``sara_ds.layout``), which an engine adapter provides.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import banks, checkpoints, functional, projector, subspace, updates
from .config import PROJECTION_DEFAULTS, SubspaceOptions, validate_group
from .layout import Layout, Matrix, collective_device


class SaraOptimizer(torch.optim.Optimizer):
    """One implementation for every base: ``base`` ('adamw', 'adafactor', 'adam_mini'), its hyperparameters, and
    the subspace switches. Use the public names below, which fix the base and document its defaults."""

    def __init__(self, params, base: str, base_defaults: dict, options: SubspaceOptions = SubspaceOptions(),
                 tp_group=None, layout: Layout | None = None):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}] if params else params
        given = [set(g) for g in groups]  # what the caller set in each group (the rest comes from the constructor)
        _refuse_duplicates(groups)
        super().__init__(groups, dict(base_defaults, **options.group_defaults(), **PROJECTION_DEFAULTS))
        self.base = updates.BASES[base]
        self.accept_changes = checkpoints.accepted(options.accept_changes)
        self.layout = layout if tp_group is None else _tensor_parallel_layout(tp_group, layout)
        self.layout = self.layout if self.layout is not None else Layout()
        names, params_in_order, self.group_members = [], [], []
        for gi, group in enumerate(self.param_groups):
            validate_group(group, self.base_name, gi, given[gi], known=self.defaults)
            group.update(sara_group=gi, lr_at_start=group.get("lr_at_start", group["lr"]),
                         skipped_steps=group.get("skipped_steps", 0))  # whole steps skipped on a non-finite gradient
            named = group.get("param_names") or [None] * len(group["params"])
            self.group_members.append(list(range(len(params_in_order), len(params_in_order) + len(named))))
            names += [name or f"param{len(params_in_order) + i}" for i, name in enumerate(named)]
            params_in_order += group["params"]
        if len({str(group.get("finite_flag")) for group in self.param_groups}) > 1:  # one flag decides the step
            raise ValueError("sara_ds: finite_flag must be the same in every param group, got "
                             f"{sorted({str(g.get('finite_flag')) for g in self.param_groups})}")
        self.matrices = [self._matrix(i, names[i], params_in_order[i], gi)
                         for gi, members in enumerate(self.group_members) for i in members]
        self.layout.bind(self.matrices)
        # what each group was built with: what a loaded state must agree on (engines rewrite param_groups later)
        self.built = [checkpoints.record({k: v for k, v in g.items() if k != "params"}, self._shapes(i), base)
                      for i, g in enumerate(self.param_groups)]
        self.banks = banks.Banks()
        self._pending_skips = None  # steps skipped by the device flag, not yet added to skipped_steps
        self._check_ownership = False

    @property
    def base_name(self) -> str:
        return self.base.name

    @property
    def param_names(self) -> list[str]:
        return [m.name for m in self.matrices]

    def _shapes(self, gi: int) -> list:
        """The whole matrices' shapes (a TP shard's put back together): a record that holds at any TP size."""
        return [tuple(self.layout.full_shape_of(self.matrices[i].param)) for i in self.group_members[gi]]

    def _matrix(self, index: int, name: str, param: Tensor, gi: int) -> Matrix:
        group, shape = self.param_groups[gi], self.layout.shape_of(param)
        full = self.layout.full_shape_of(param)
        left = "rank" in group and len(shape) >= 2 and self._basis_on_left(param, group, full)
        return described(index, name, param, shape, gi, group, left, self.base)

    def _basis_on_left(self, param: Tensor, group: dict, full_shape) -> bool:
        split = self.layout.split_axis_of(param) if group["tp_side"] == "unsplit" else None
        return projector.basis_on_left(full_shape[0], full_shape[1:].numel(), group["proj_type"], split)

    # ------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.layout = self.layout.adopt(self.param_groups)
        work = [(group, slot) for group in self.param_groups for slot in self._slots(group) if slot.grad is not None]
        grads = [slot.grad for _, slot in work]
        template = checkpoints.is_template_step(self.state, self.param_groups, grads)
        on_device = (functional.flag_on_device(self.param_groups[0]["finite_flag"], grads, self.layout.owners_step())
                     and not any(self._creates_or_refreshes(g, s) for g, s in work))
        found = self._any_rank(functional.nonfinite(grads, on_device))
        if not on_device and bool(found) and bool(self._any_rank(functional.nonfinite(grads, False, exact=True))):
            for group in self.param_groups:  # as GradScaler and DeepSpeed's overflow check: nothing moves
                group["skipped_steps"] += 1
            self.layout.finish()
            return loss
        keep = None
        if on_device:
            keep = ~found.to(grads[0].device)
            skipped = found.float().to(grads[0].device)
            self._pending_skips = skipped if self._pending_skips is None else self._pending_skips.add_(skipped)
        self._refresh_where_due([(g, s) for g, s in work if self._projected(g, s)])
        full_rank = [(g, s) for g, s in work if not self._projected(g, s)]
        if keep is not None:  # a bank masks its own stacked gradient (one op, not one per matrix)
            functional.zero_unless(keep, [s.grad for _, s in full_rank])
        self._full_rank_steps(full_rank, keep)
        for group, slots in self._banks([(g, s) for g, s in work if self._projected(g, s)]):
            states = [self.state[s.index] for s in slots]
            bank = self.banks.bank_for(states)
            functional.projected_step(slots, states, bank.state, group, self.base, keep)
        self.layout.finish(lambda targets, group: functional.decay(targets, group, keep))
        if template:
            checkpoints.forget_template_step(self.state)
        return loss

    def _slots(self, group) -> list:
        slots = self.layout.slots(group, self.group_members[group["sara_group"]])
        if self._check_ownership:
            checkpoints.check_row_blocks(self.state, slots, self.matrices)  # the most precise refusal first
            self._refuse_state_owned_elsewhere()
            for slot in slots:  # loaded state goes where the matrix is stepped (a ZeRO-offloaded partition: the CPU)
                st = self.state.get(slot.index, {})
                st.update({k: v.to(slot.target.device) for k, v in st.items() if isinstance(v, Tensor)})
        return slots

    def _projected(self, group, slot) -> bool:
        return not slot.fragment and "rank" in group and slot.grad.dim() >= 2

    def _creates_or_refreshes(self, group, slot) -> bool:
        """Steps that create state or refresh a basis decide on the host: an SVD of a NaN gradient must not
        happen, and a first step has no state to leave unchanged."""
        st = self.state[slot.index]
        return functional.refresh_due(st, group) if self._projected(group, slot) else "step" not in st

    def _any_rank(self, found: Tensor) -> Tensor:
        """``found`` (0-d, > 0 means true) maxed over every rank that holds another part of this step: one 4-byte
        all-reduce per such group (a rank that stepped alone would desynchronise weights and the next refresh)."""
        for group in self.layout.step_groups():
            found = found.to(collective_device(group)).reshape(1)
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return found.max() > 0

    def _refresh_where_due(self, projected: list) -> None:
        """State at a matrix's first step, and the refreshes that are due, in batches of matrices that share one
        spectrum call (``functional.refresh``): same-shape ones where ``foreach`` is on, one by one otherwise."""
        batches: dict = {}
        for group, slot in projected:
            st = self.state[slot.index]
            if "basis" not in st:
                local = projector.as_matrix(slot.grad).shape
                full = slot.context.full_shape(local)
                left = self._basis_on_left(self.matrices[slot.index].param, group, torch.Size(full))
                functional.init_projected(st, local, full, left, group, slot.index, self.matrices[slot.index].name,
                                          slot.grad.device, slot.rows)
            if functional.refresh_due(st, group):
                batches.setdefault(self._batch_key(group, slot, st), (group, []))[1].append(slot)
        for group, slots in batches.values():
            states = [self.state[s.index] for s in slots]
            generators = [subspace.refresh_generator(group["seed"], s.index, st["step"] // group["update_proj_gap"])
                          for s, st in zip(slots, states)]
            functional.refresh(slots, states, group, self.base, generators)

    def _batch_key(self, group, slot, st) -> tuple:
        together = _batched(group, slot.grad) and slot.grad.dim() == 2
        return (id(group), tuple(slot.grad.shape), slot.grad.dtype, slot.grad.device, st["left"], st["rank"],
                slot.context.bank_key, "basis" in st, None if together else slot.index)

    def _banks(self, projected: list) -> list:
        """Same-shape projected matrices stepped as one where ``foreach`` is on (``sara_ds.banks``); every other
        one is a bank of one."""
        return banks.plan(projected, self.state, lambda group, slot: _batched(group, slot.grad)
                          and group["subspace"] != "online_pca" and slot.grad.dim() == 2)

    def _full_rank_steps(self, full_rank: list, keep) -> None:
        by_group: dict = {}
        for group, slot in full_rank:
            by_group.setdefault(id(group), (group, []))[1].append(slot)
        for group, slots in by_group.values():
            if self.base.name == "adamw":
                functional.full_rank_adamw(slots, [self.state[s.index] for s in slots], group, keep)
                continue
            for s in slots:
                functional.full_rank_step(s, self.state[s.index], group, self.base, self.matrices[s.index].name, keep)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """torch's layout: ``state`` keyed by matrix id (a parameter's position in the order the optimizer was built
        with, which is torch's own key for a plain model) and each group's ``params`` as those ids; each group also
        records what the optimizer was built with (``checkpoints.record``)."""
        self._count_device_skips()
        groups = [dict(checkpoints.record({k: v for k, v in g.items() if k != "params"}, self._shapes(i),
                                          self.base_name), params=list(self.group_members[i]))
                  for i, g in enumerate(self.param_groups)]
        states = {i: st for i, st in self.state.items() if isinstance(i, int)}
        return {"state": self.layout.export_state(states), "param_groups": groups}

    def load_state_dict(self, state_dict: dict, accept=None) -> None:
        """Refused, listing every difference, when the state was saved by an optimizer built otherwise
        (``checkpoints``), but for the changes ``accept`` (default: the ``accept_changes`` option) names."""
        accept = self.accept_changes if accept is None else checkpoints.accepted(accept)
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError(checkpoints.not_a_state(state_dict))
        saved_groups = state_dict["param_groups"]
        checkpoints.refuse_differences(saved_groups, self.built, accept)
        state = _keyed_by_matrix(by_matrix_id(state_dict["state"]), saved_groups, self.group_members)
        self.layout = self.layout.adopt(self.param_groups)
        state = self.layout.import_state(state, self.param_groups, self.group_members)
        checkpoints.check_states(state, self.matrices, self.param_groups, self.base)
        for index, group in enumerate(checkpoints.restore_groups(self.param_groups, saved_groups, accept)):
            validate_group(group, self.base_name, index)
        self.state.clear()
        self.state.update(checkpoints.copied(state))  # stepping must not write into the caller's state dict
        self.layout.reset()
        self.banks.clear()
        self._pending_skips = None
        self._check_ownership = True

    def _refuse_state_owned_elsewhere(self) -> None:
        """After a load: state of a matrix another rank steps was written at another data-parallel size."""
        owned = {i: self.layout.owns(i) for i in self.state if isinstance(i, int)}
        checkpoints.refuse_owned_elsewhere(sorted(i for i, mine in owned.items() if mine is False))
        self._check_ownership = None in owned.values()

    def _count_device_skips(self) -> None:
        """Add the steps the device flag skipped to each group's ``skipped_steps`` (reads one number back: done
        when the count is asked for or saved, never in a step)."""
        if self._pending_skips is not None:
            skipped, self._pending_skips = int(self._pending_skips.item()), None
            for group in self.param_groups:
                group["skipped_steps"] += skipped

    # ------------------------------------------------------------ metrics

    def state_of(self, param: Tensor) -> dict:
        """The state of the matrix ``param`` is (a tensor it was built with); {} where none is held here."""
        return self.state.get(self.layout.index_of(param), {})

    def matrix_states(self):
        """(matrix id, state) for every projected matrix this process holds state for."""
        return ((i, st) for i, st in self.state.items() if isinstance(i, int) and "basis" in st)

    def subspace_overlaps(self) -> dict:
        """name -> ||B_old^T B_new||_F^2 / r at the latest refresh (NaN before the second one)."""
        return {self.matrices[i].name: st["overlap"] for i, st in self.matrix_states()}

    def refresh_counts(self) -> dict:
        """``refreshes``: refreshes of the matrices held here, summed (a ZeRO-3 row block's on its first rows' rank
        alone). ``skipped_steps``: whole steps skipped for a NaN or Inf gradient on any rank holding part of one."""
        self._count_device_skips()
        return {"refreshes": sum(st["refreshes"] for _, st in self.matrix_states() if st.get("row_block", [0])[0] == 0),
                "skipped_steps": max((g["skipped_steps"] for g in self.param_groups), default=0)}

    def bytes_sent(self) -> dict:
        """Bytes this process has put into its layout's collectives, by kind ('tensor_parallel': TP refreshes and
        sums; 'exchange': ZeRO straddlers to and from their steppers)."""
        return self.layout.bytes_sent()

    def tp_bytes_sent(self) -> int:
        return self.bytes_sent().get("tensor_parallel", 0)

    def zero_bytes_sent(self) -> int:
        return self.bytes_sent().get("exchange", 0)

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state on this process."""
        return sum(t.numel() * t.element_size() for t in tensors(self.state))


def described(index: int, name: str, param: Tensor, shape, gi: int, group: dict, left: bool, base) -> Matrix:
    """A parameter as a layout needs to know it (``layout.Matrix``); ``left``: its basis side, if projected."""
    projected = "rank" in group and len(shape) >= 2
    rows, cols = (shape[0], shape[1:].numel()) if projected else (0, 0)
    return Matrix(index, name, param, shape, gi, projected or not base.elementwise,
                  functional.state_numel(shape, projected, left, group, base), left if projected else None,
                  (rows if left else cols) * min(group["rank"], rows, cols) if projected else 0,
                  projected and not left and group["subspace"] != "online_pca", base.name)


def _refuse_duplicates(groups: list) -> None:
    """A parameter listed twice would be stepped twice a step (torch only warns)."""
    for gi, group in enumerate(groups):
        members = group["params"] if isinstance(group["params"], (list, tuple)) else [group["params"]]
        seen = {}
        for i, p in enumerate(members):
            if id(p) in seen:
                names = group.get("param_names") or [f"parameter {j} of the group" for j in range(len(members))]
                raise ValueError(f"sara_ds: param group {gi} lists {names[i]} twice (positions {seen[id(p)]} and {i}); "
                                 "each parameter belongs in one group, once")
            seen[id(p)] = i


def _tensor_parallel_layout(tp_group, layout):
    """``tp_group=``: weights carrying Megatron's or AutoTP's tensor-parallel marks, split over that group."""
    if layout is not None:
        raise ValueError("sara_ds: pass tp_group or layout, not both (a TensorParallelLayout takes the group)")
    from .sharding.tensor_parallel import TensorParallelLayout

    return TensorParallelLayout(tp_group)


def by_matrix_id(saved_state: dict) -> dict:
    """A saved optimizer ``state`` keyed by matrix id. One saved under ZeRO by sara_ds 0.1 nests it one level down,
    under the flat partition's key: {partition: {matrix id: state}}."""
    out = {}
    for key, st in saved_state.items():
        if isinstance(st, dict) and st and all(isinstance(k, int) for k in st):
            out.update(st)
        else:
            out[key] = st
    return out


def _keyed_by_matrix(state: dict, saved_groups: list, members: list) -> dict:
    """A state keyed by other names for the same order (torch.distributed.checkpoint's set_state_dict hands it over
    keyed by parameter name) keyed by matrix id, position for position, as torch's own load_state_dict maps it."""
    if all(isinstance(k, int) for k in state):
        return state
    order = {key: index for group, ids in zip(saved_groups, members) for key, index in zip(group["params"], ids)}
    unknown = sorted(str(k) for k in state if k not in order)
    if unknown:
        raise ValueError(f"sara_ds: the loaded state holds {unknown[:3]}, which no param group of it lists")
    return {order[k]: st for k, st in state.items()}


def _batched(group, grad: Tensor) -> bool:
    """``foreach``: True / False as given; None as torch's optimizers decide, batched on a GPU only."""
    foreach = group.get("foreach")
    return grad.is_cuda if foreach is None else foreach


def tensors(obj):
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


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
                 tp_group=None, layout=None, **options):
        base = dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, "adamw", base, SubspaceOptions.from_kwargs("SaraAdamW", options), tp_group, layout)


class SaraAdafactor(SaraOptimizer):
    """Low-rank Adafactor (factored second moment on the projected matrix), as GaLore-Adafactor.

    Defaults follow the GaLore scripts: no first moment (``beta1=None``),
    ``decay_rate=-0.8``, ``eps=1e-30``, ``clip_threshold=1.0``, explicit ``lr``.
    Keyword options as ``SaraAdamW``'s.
    """

    def __init__(self, params, lr=1e-2, beta1=None, decay_rate=-0.8, eps=1e-30, clip_threshold=1.0, weight_decay=0.0,
                 *, tp_group=None, layout=None, **options):
        base = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps, clip_threshold=clip_threshold,
                    weight_decay=weight_decay)
        super().__init__(params, "adafactor", base, SubspaceOptions.from_kwargs("SaraAdafactor", options), tp_group,
                         layout)


class SaraAdamMini(SaraOptimizer):
    """Low-rank Adam-mini: one second moment per block (per output row; per column of R when projected).
    Keyword options as ``SaraAdamW``'s."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, tp_group=None, layout=None,
                 **options):
        base = dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, "adam_mini", base, SubspaceOptions.from_kwargs("SaraAdamMini", options), tp_group,
                         layout)


OPTIMIZERS = {"SaraAdamW": SaraAdamW, "SaraAdafactor": SaraAdafactor, "SaraAdamMini": SaraAdamMini}
