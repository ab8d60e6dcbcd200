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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from . import Slot, ownership


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

    def steps(self, index: int) -> bool:
        """This rank steps matrix ``index`` (or its piece of it)."""
        return self.steppers.get(index, self.rank) == self.rank

    def finish(self) -> None:
        """After the step: each straddler's new weights go from its stepper back to every holder's partition."""
        ops = []
        for kind, index, peer, new, target in self.pending:
            if kind == "copy":
                target.copy_(new)
            else:
                tensor = new.contiguous() if kind == "send" else target
                op = dist.isend if kind == "send" else dist.irecv
                ops.append(dist.P2POp(op, tensor, _global(self, peer), self.group, index))
        self.pending.clear()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()


class LayoutCache(dict):
    """id(flat partition) -> Layout. Cleared when the engine relinks (checkpoint load)."""


def is_flat_partition(params, original_params) -> bool:
    return all(p.dim() == 1 for p in params) and any(hasattr(q, "_hp_mapping") for q in original_params)


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
        q = original_params[index]
        cost = ownership.refresh_cost(q.shape) if q.dim() >= 2 else q.numel()
        if len(holders) == 1:
            loads[holders[0][0]] += cost
        elif needs_full(index):
            straddlers.append((index, [r for r, _, _ in holders], cost))
    return ownership.assign_among(straddlers, loads)


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
            ops.append(dist.P2POp(dist.isend, grad.contiguous(), peer, layout.group, f.index))
            ops.append(dist.P2POp(dist.isend, weight.detach(), peer, layout.group, f.index))  # waited below
            layout.pending.append(("recv", f.index, stepper, None, weight.detach()))
            continue
        parts = pieces[f.index] = [(f.lp_start, grad, weight.detach())]
        for r, lp_start, numel in layout.owners[f.index]:
            if r == layout.rank:
                continue
            g, w = torch.empty(numel, dtype=grad.dtype, device=grad.device), torch.empty(numel, dtype=weight.dtype,
                                                                                         device=weight.device)
            parts.append((lp_start, g, w))
            ops.append(dist.P2POp(dist.irecv, g, _global(layout, r), layout.group, f.index))
            ops.append(dist.P2POp(dist.irecv, w, _global(layout, r), layout.group, f.index))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    full = {}
    for index, parts in pieces.items():
        q = original_params[index]
        g = torch.empty(q.numel(), dtype=parts[0][1].dtype, device=parts[0][1].device)
        w = torch.empty(q.numel(), dtype=parts[0][2].dtype, device=parts[0][2].device)
        for lp_start, gp, wp in parts:
            g.narrow(0, lp_start, gp.numel()).copy_(gp)
            w.narrow(0, lp_start, wp.numel()).copy_(wp)
        full[index] = (g.view(q.shape), w.view(q.shape))
        lp_start, _, mine = parts[0]
        layout.pending.append(("copy", index, layout.rank, w.narrow(0, lp_start, mine.numel()), mine))
        for r, lp_start, numel in layout.owners[index]:
            if r != layout.rank:
                layout.pending.append(("send", index, r, w.narrow(0, lp_start, numel), None))
    return full


def partition_slots(params, members, original_params, state, cache: LayoutCache, needs_full, context_for,
                    tp_group=None) -> list[Slot]:
    slots = []
    for flat in params:
        layout = cache.get(id(flat))
        if layout is None:
            layout = cache[id(flat)] = build_layout(flat, members, original_params, tp_group)
        if layout.steppers is None:
            layout.steppers = choose_steppers(layout, original_params, needs_full)
        if flat.grad is None:
            continue
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
            st = root.setdefault(f.index, {})
            context = context_for(q)
            if f.index in full:  # a straddler stepped here, whole
                grad, weight = full[f.index]
                slots.append(Slot(f.index, grad, weight, st, context=context))
                continue
            grad = flat.grad.narrow(0, f.hp_start, f.numel)
            target = flat.narrow(0, f.hp_start, f.numel)
            if f.numel == q.numel():
                slots.append(Slot(f.index, grad.view(q.shape), target.view(q.shape), st, context=context))
            else:
                slots.append(Slot(f.index, grad, target, st, fragment=True, context=context))
    return slots
