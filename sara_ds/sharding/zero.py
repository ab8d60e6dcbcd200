"""DeepSpeed ZeRO stage 1/2: flat fp32 partitions back to 2-D matrices.

Under ZeRO-1/2 the inner optimizer's group holds one 1-D fp32 tensor: this DP
rank's slice of the group's flattened parameters. DeepSpeed links every model
parameter to its piece of that slice through ``param._hp_mapping`` (the same
links behind ``deepspeed.utils.safe_get_full_grad``):

    lp_fragment_address.start / .numel   where the piece lies inside param.view(-1)
    hp_fragment_address.start            where it lies inside the flat partition

A parameter wholly inside this rank's partition is a zero-copy 2-D view of the
flat gradient. A parameter that straddles a partition boundary ("straddler") and
needs its whole gradient (projected matrices, non-elementwise bases) is stepped
by one of the ranks holding a piece of it, its *stepper* (chosen by
``ownership.assign_among``, balancing refresh cost): the other holders send it
their pieces of the gradient and of the fp32 weight, point to point, and take
their pieces of the new weight back after the step (``Layout.finish``). Only the
stepper keeps the matrix's state. An elementwise base's full-rank straddler is
stepped piece by piece where each piece lies. State is stored per stepped matrix
under ``state[flat][matrix id]``, so the low-rank state is partitioned across DP
ranks the way the parameters are, each matrix's once.

Under ZeRO-3 DeepSpeed calls the optimizer once per sub-group, with one 1-D fp32 tensor: this rank's
pieces of the sub-group's parameters, back to back. Every parameter is cut into ``world`` equal pieces
(the last padded), rank r holding elements ``[r p, (r+1) p)`` of its flattened tensor, so the map follows
from the shapes alone (``build_zero3_layout``), and every matrix is a straddler held by all ranks. Each
matrix stepped whole gets one stepper, the rank holding the least optimizer state so far
(``choose_zero3_steppers``): whole-matrix ownership, as DeepSpeed's own Muon does at stage 3, through
the same exchange as the ZeRO-1/2 straddlers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from . import Slot, numel_of, ownership, shape_of


@dataclass(frozen=True)
class Fragment:
    index: int      # matrix id
    lp_start: int   # offset inside param.view(-1)
    numel: int
    hp_start: int   # offset inside the flat partition


@dataclass
class Layout:
    fragments: list            # this rank's Fragments, in flat order
    owners: dict               # matrix id -> [(dp rank, lp_start, numel)] for every rank holding a piece
    group: object              # the DP process group
    rank: int                  # this process's rank inside ``group``
    steppers: dict = None      # straddler stepped whole -> the DP rank that steps it (``choose_steppers``)
    pending: list = field(default_factory=list)  # (kind, matrix id, peer, new piece, target): for ``finish``
    zero3: bool = False        # a ZeRO-3 sub-group (``build_zero3_layout``)
    wire: object = None        # where the exchange's tensors must be for the group's backend (NCCL: the GPU), if the
                               # partition is elsewhere (``offload_optimizer: cpu``); None: where they are
    bytes_sent: int = 0        # this rank's point-to-point bytes of the straddler exchange, so far

    def steps(self, index: int) -> bool:
        """This rank steps matrix ``index`` (or its piece of it)."""
        return self.steppers.get(index, self.rank) == self.rank

    def finish(self) -> None:
        """After the step: each straddler's new weights go from its stepper back to every holder's partition."""
        ops, staged = [], []
        for kind, index, peer, new, target in self.pending:
            if kind == "copy":
                target.copy_(new)
            elif kind == "send":
                tensor = self.to_wire(new)
                self.bytes_sent += tensor.numel() * tensor.element_size()
                ops.append(dist.P2POp(dist.isend, tensor, _global(self, peer), self.group, index))
            else:
                tensor = target if self.wire is None else torch.empty_like(target, device=self.wire)
                staged += [(tensor, target)] if tensor is not target else []
                ops.append(dist.P2POp(dist.irecv, tensor, _global(self, peer), self.group, index))
        self.pending.clear()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for tensor, target in staged:
            target.copy_(tensor)

    def to_wire(self, t: Tensor) -> Tensor:
        return t.contiguous() if self.wire is None else t.to(self.wire).contiguous()


class LayoutCache(dict):
    """id(flat partition) -> Layout. Cleared when the engine relinks (checkpoint load). ``loads``: the optimizer
    state (elements) each DP rank steps so far, carried across ZeRO-3's sub-groups (``choose_zero3_steppers``)."""

    def __init__(self):
        super().__init__()
        self.loads = None

    def clear(self):
        super().clear()
        self.loads = None


def is_flat_partition(params, original_params) -> bool:
    return all(p.dim() == 1 for p in params) and any(hasattr(q, "_hp_mapping") for q in original_params)


def is_zero3_partition(params, original_params) -> bool:
    """A ZeRO-3 sub-group's fp32 partition: stage 3 names it ``"<first ds_id>_<last ds_id>"`` of its parameters."""
    return (all(p.dim() == 1 and isinstance(getattr(p, "ds_id", None), str) for p in params)
            and any(hasattr(q, "ds_tensor") for q in original_params))


def _optimized(q) -> bool:
    """What DeepSpeed keeps in an optimizer group (``deepspeed.runtime.utils.is_optimized_parameter``)."""
    return q.requires_grad and numel_of(q) > 0


def zero3_piece(numel: int, world: int, rank: int) -> int:
    """Elements of a parameter that ZeRO-3 rank ``rank`` of ``world`` holds: its piece of ``ceil(numel / world)``
    (DeepSpeed's ``partition_numel()``), padding excluded."""
    piece = -(-numel // world)
    return max(0, min(piece, numel - rank * piece))


def build_zero3_layout(flat: Tensor, members, original_params) -> Layout:
    """The sub-group's parameters are a run of the group's trainable ones, from the ``ds_id`` its fp32 partition
    names first to the one it names last; each holds ``partition_numel()`` elements of it, padding included."""
    first, last = (int(x) for x in flat.ds_id.split("_"))
    trainable = [i for i in members if _optimized(original_params[i])]
    ids = [original_params[i].ds_id for i in trainable]
    if first not in ids or last not in ids:
        raise RuntimeError(f"sara_ds: ZeRO-3 sub-group {flat.ds_id!r} names parameters (ds_id {first} to {last}) that "
                           "are not in the param group this optimizer was built with")
    run = trainable[ids.index(first):ids.index(last) + 1]
    group = original_params[run[0]].ds_process_group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine, owners, offset = [], {}, 0
    for i in run:
        q = original_params[i]
        piece, numel = q.partition_numel(), numel_of(q)
        owners[i] = [(r, r * piece, zero3_piece(numel, world, r)) for r in range(world) if zero3_piece(numel, world, r)]
        if zero3_piece(numel, world, rank):
            mine.append(Fragment(i, rank * piece, zero3_piece(numel, world, rank), offset))
        offset += piece
    if offset != flat.numel():
        raise RuntimeError(f"sara_ds: ZeRO-3 sub-group {flat.ds_id!r} holds {flat.numel()} elements on this rank, but "
                           f"its parameters' pieces add up to {offset}: DeepSpeed's stage-3 layout is not the one "
                           "sara_ds knows (deepspeed/runtime/zero/stage3.py)")
    return Layout(mine, owners, group, rank, zero3=True)


def build_layout(flat: Tensor, members, original_params, tp_group=None) -> Layout:
    storage = flat.untyped_storage().data_ptr()
    mine, group = [], None
    for i in members:
        q = original_params[i]
        group = getattr(q, "_dp_group", group)
        hp = getattr(q, "_hp_mapping", None)
        if hp is None or hp.hp_fragment.untyped_storage().data_ptr() != storage:
            continue
        mine.append(Fragment(i, hp.lp_fragment_address.start, hp.lp_fragment_address.numel, hp.hp_fragment_address.start))
    mine.sort(key=lambda f: f.hp_start)
    _check_same_ownership_across_tp(mine, original_params, tp_group)
    world = dist.get_world_size(group)
    everyone = [None] * world
    dist.all_gather_object(everyone, [(f.index, f.lp_start, f.numel) for f in mine], group=group)
    owners: dict = {}
    for r, frags in enumerate(everyone):
        for index, lp_start, numel in frags:
            owners.setdefault(index, []).append((r, lp_start, numel))
    return Layout(mine, owners, group, dist.get_rank(group))


def _check_same_ownership_across_tp(mine, original_params, tp_group) -> None:
    """TP x ZeRO: a TP-split matrix's refresh is a collective of the TP ranks that own its shards, so
    the ranks of one TP group must own the same TP-split matrices (they do when every TP rank's shards
    have the same shapes, and so the same ZeRO partitioning)."""
    from .tensor_parallel import is_tp_sharded

    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    owned = [(f.index, f.lp_start, f.numel) for f in mine if is_tp_sharded(original_params[f.index])]
    everyone = [None] * dist.get_world_size(tp_group)
    dist.all_gather_object(everyone, owned, group=tp_group)
    for tp_rank, other in enumerate(everyone):
        if other != owned:
            differ = sorted(set(other) ^ set(owned))[:4]
            raise RuntimeError(
                f"sara_ds: under tensor parallelism x ZeRO, TP rank {tp_rank} owns other pieces of the TP-split "
                f"matrices than this rank does (matrix id, offset, size: {differ}). The TP shards must have the "
                "same shapes on every TP rank, so that ZeRO partitions them alike."
            )


def choose_steppers(layout: Layout, original_params, needs_full) -> dict:
    """One stepper per straddler that is stepped whole: the least-loaded of its holders, costliest first, where a
    rank's load starts at the refresh cost of the matrices it holds whole. Every rank computes the same answer."""
    loads = [0] * (dist.get_world_size(layout.group))
    straddlers = []
    for index, holders in sorted(layout.owners.items()):
        shape = shape_of(original_params[index])
        cost = ownership.refresh_cost(shape) if len(shape) >= 2 else shape.numel()
        if len(holders) == 1:
            loads[holders[0][0]] += cost
        elif needs_full(index):
            straddlers.append((index, [r for r, _, _ in holders], cost))
    return ownership.assign_among(straddlers, loads)


def choose_zero3_steppers(layout: Layout, needs_full, state_numel, loads: list) -> dict:
    """ZeRO-3: each matrix stepped whole goes to the rank that steps the least optimizer state so far, largest
    first within a sub-group, with ``loads`` carried from one sub-group to the next (DeepSpeed steps them in the
    same order on every rank). Greedy list scheduling: no rank ends above the mean plus one matrix's state."""
    items = [(index, [r for r, _, _ in holders], state_numel(index))
             for index, holders in sorted(layout.owners.items()) if needs_full(index)]
    chosen = ownership.assign_among(items, loads)
    for index, _, cost in items:
        loads[chosen[index]] += cost
    return {index: rank for index, rank in chosen.items() if len(layout.owners[index]) > 1}


def _wire(group, flat: Tensor):
    """NCCL moves GPU tensors only: a partition offloaded to the CPU is exchanged through the current GPU."""
    if dist.get_backend(group) == "nccl" and not flat.is_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _global(layout: Layout, r: int) -> int:
    return dist.get_global_rank(layout.group, r) if layout.group is not None else r


def _gather_to_steppers(layout: Layout, flat: Tensor, original_params) -> dict:
    """Full gradients and fp32 weights of the straddlers this rank steps, from their other holders; the other
    holders' pieces of the new weights are queued on ``layout.pending`` for ``Layout.finish``."""
    ops, pieces = [], {}
    for f in layout.fragments:
        stepper = layout.steppers.get(f.index)
        if stepper is None:
            continue
        grad, weight = flat.grad.narrow(0, f.hp_start, f.numel), flat.narrow(0, f.hp_start, f.numel)
        if stepper != layout.rank:
            peer = _global(layout, stepper)
            layout.bytes_sent += grad.numel() * grad.element_size() + weight.numel() * weight.element_size()
            ops.append(dist.P2POp(dist.isend, layout.to_wire(grad), peer, layout.group, f.index))
            ops.append(dist.P2POp(dist.isend, layout.to_wire(weight.detach()), peer, layout.group, f.index))  # waited
            layout.pending.append(("recv", f.index, stepper, None, weight.detach()))
            continue
        parts = pieces[f.index] = [(f.lp_start, grad, weight.detach())]
        for r, lp_start, numel in layout.owners[f.index]:
            if r == layout.rank:
                continue
            wire = layout.wire or grad.device
            g, w = torch.empty(numel, dtype=grad.dtype, device=wire), torch.empty(numel, dtype=weight.dtype, device=wire)
            parts.append((lp_start, g, w))
            ops.append(dist.P2POp(dist.irecv, g, _global(layout, r), layout.group, f.index))
            ops.append(dist.P2POp(dist.irecv, w, _global(layout, r), layout.group, f.index))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    full = {}
    for index, parts in pieces.items():
        shape = shape_of(original_params[index])
        g = torch.empty(shape.numel(), dtype=parts[0][1].dtype, device=parts[0][1].device)
        w = torch.empty(shape.numel(), dtype=parts[0][2].dtype, device=parts[0][2].device)
        for lp_start, gp, wp in parts:
            g.narrow(0, lp_start, gp.numel()).copy_(gp)
            w.narrow(0, lp_start, wp.numel()).copy_(wp)
        full[index] = (g.view(shape), w.view(shape))
        lp_start, _, mine = parts[0]
        layout.pending.append(("copy", index, layout.rank, w.narrow(0, lp_start, mine.numel()), mine))
        for r, lp_start, numel in layout.owners[index]:
            if r != layout.rank:
                layout.pending.append(("send", index, r, w.narrow(0, lp_start, numel), None))
    return full


def partition_slots(params, members, original_params, state, cache: LayoutCache, needs_full, context_for,
                    tp_group=None, state_numel=None) -> list[Slot]:
    slots = []
    for flat in params:
        layout = cache.get(id(flat))
        if layout is None:
            if is_zero3_partition([flat], original_params):
                layout = build_zero3_layout(flat, members, original_params)
            else:
                layout = build_layout(flat, members, original_params, tp_group)
            cache[id(flat)] = layout
        if layout.steppers is None and layout.zero3:
            if cache.loads is None:
                cache.loads = [0] * dist.get_world_size(layout.group)
            layout.steppers = choose_zero3_steppers(layout, needs_full, state_numel, cache.loads)
        elif layout.steppers is None:
            layout.steppers = choose_steppers(layout, original_params, needs_full)
        if flat.grad is None:
            continue
        layout.wire = _wire(layout.group, flat)
        full = _gather_to_steppers(layout, flat, original_params)
        root = state[flat]
        stepped = {f.index for f in layout.fragments if layout.steps(f.index)}
        if root and set(root) != stepped:
            raise RuntimeError(
                "sara_ds: the loaded optimizer state holds matrices "
                f"{sorted(set(root) - stepped)[:8]} that this rank does not own (and lacks {sorted(stepped - set(root))[:8]}). "
                "The checkpoint was written with a different data-parallel size or ZeRO partitioning. "
                "sara_ds state is partitioned by matrix ownership: resume at the same data-parallel size and ZeRO stage, "
                "or convert with `python -m sara_ds.ds_to_universal` and load with checkpoint.load_universal=true."
            )
        for f in layout.fragments:
            if not layout.steps(f.index):
                continue
            q = original_params[f.index]
            shape = shape_of(q)
            st = root.setdefault(f.index, {})
            context = context_for(q)
            if f.index in full:  # a straddler stepped here, whole
                grad, weight = full[f.index]
                slots.append(Slot(f.index, grad, weight, st, context=context))
                continue
            grad = flat.grad.narrow(0, f.hp_start, f.numel)
            target = flat.narrow(0, f.hp_start, f.numel)
            if f.numel == shape.numel():
                slots.append(Slot(f.index, grad.view(shape), target.view(shape), st, context=context))
            else:
                slots.append(Slot(f.index, grad, target, st, fragment=True, context=context))
    return slots
