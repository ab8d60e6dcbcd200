"""ZeRO partitions: a param group flattened and cut into one contiguous piece per data-parallel rank, mapped back to
matrices. Engine-agnostic: ``integrations.deepspeed`` finds each rank's ``Fragment``s from DeepSpeed's own links,
and this module does the rest.

A matrix wholly inside this rank's partition is a zero-copy view of the flat gradient. A matrix that straddles a
partition boundary ("straddler") and needs its whole gradient (projected matrices, non-elementwise bases) is
stepped by one of the ranks holding a piece of it, its *stepper* (``choose_steppers``, balancing refresh cost):
the other holders send it their pieces of the gradient and of the fp32 weight, point to point, and take their
pieces of the new weight back after the step (``Partition.finish``). Only the stepper keeps the matrix's state, so
the low-rank state is partitioned across DP ranks the way the parameters are, each matrix's once. An elementwise
base's full-rank straddler is stepped piece by piece where each piece lies.

Under ZeRO-3 every parameter is cut into ``world`` equal pieces (the last padded), rank r holding elements
``[r p, (r+1) p)`` of its flattened tensor, so every matrix is a straddler held by all ranks. Each matrix stepped
whole gets one stepper, the rank holding the least optimizer state so far (``choose_zero3_steppers``):
whole-matrix ownership, as DeepSpeed's own Muon does at stage 3, through the same exchange.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import Slot
from . import ownership


@dataclass(frozen=True)
class Fragment:
    index: int      # matrix id
    lp_start: int   # offset inside param.view(-1)
    numel: int
    hp_start: int   # offset inside the flat partition


@dataclass
class Partition:
    """This rank's piece of one flat partition: its fragments, who holds the rest, who steps each straddler."""

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


def zero3_piece(numel: int, world: int, rank: int) -> int:
    """Elements of a parameter that ZeRO-3 rank ``rank`` of ``world`` holds: its piece of ``ceil(numel / world)``
    (DeepSpeed's ``partition_numel()``), padding excluded."""
    piece = -(-numel // world)
    return max(0, min(piece, numel - rank * piece))


def exchange_owners(mine: list, group) -> dict:
    """matrix id -> [(dp rank, lp_start, numel)] of every rank's fragments, from each rank's own (one
    ``all_gather_object`` over the data-parallel group)."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, [(f.index, f.lp_start, f.numel) for f in mine], group=group)
    owners: dict = {}
    for r, frags in enumerate(everyone):
        for index, lp_start, numel in frags:
            owners.setdefault(index, []).append((r, lp_start, numel))
    return owners


def check_same_ownership_across_tp(mine: list, split: set, tp_group) -> None:
    """TP x ZeRO: a TP-split matrix's refresh is a collective of the TP ranks that own its shards, so
    the ranks of one TP group must own the same TP-split matrices (they do when every TP rank's shards
    have the same shapes, and so the same ZeRO partitioning). ``split``: the ids of the TP-split matrices."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    owned = [(f.index, f.lp_start, f.numel) for f in mine if f.index in split]
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


def choose_steppers(partition: Partition, matrices: list) -> dict:
    """One stepper per straddler that is stepped whole: the least-loaded of its holders, costliest first, where a
    rank's load starts at the refresh cost of the matrices it holds whole. Every rank computes the same answer."""
    loads = [0] * (dist.get_world_size(partition.group))
    straddlers = []
    for index, holders in sorted(partition.owners.items()):
        shape = matrices[index].shape
        cost = ownership.refresh_cost(shape) if len(shape) >= 2 else shape.numel()
        if len(holders) == 1:
            loads[holders[0][0]] += cost
        elif matrices[index].whole:
            straddlers.append((index, [r for r, _, _ in holders], cost))
    return ownership.assign_among(straddlers, loads)


def choose_zero3_steppers(partition: Partition, matrices: list, loads: list) -> dict:
    """ZeRO-3: each matrix stepped whole goes to the rank that steps the least optimizer state so far, largest
    first within a sub-group, with ``loads`` carried from one sub-group to the next (DeepSpeed steps them in the
    same order on every rank). Greedy list scheduling: no rank ends above the mean plus one matrix's state."""
    items = [(index, [r for r, _, _ in holders], matrices[index].state_numel)
             for index, holders in sorted(partition.owners.items()) if matrices[index].whole]
    chosen = ownership.assign_among(items, loads)
    for index, _, cost in items:
        loads[chosen[index]] += cost
    return {index: rank for index, rank in chosen.items() if len(partition.owners[index]) > 1}


def wire(group, flat: Tensor):
    """NCCL moves GPU tensors only: a partition offloaded to the CPU is exchanged through the current GPU."""
    if dist.get_backend(group) == "nccl" and not flat.is_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _global(partition: Partition, r: int) -> int:
    return dist.get_global_rank(partition.group, r) if partition.group is not None else r


def _gather_to_steppers(partition: Partition, flat: Tensor, matrices: list) -> dict:
    """Full gradients and fp32 weights of the straddlers this rank steps, from their other holders; the other
    holders' pieces of the new weights are queued on ``partition.pending`` for ``Partition.finish``."""
    ops, pieces = [], {}
    for f in partition.fragments:
        stepper = partition.steppers.get(f.index)
        if stepper is None:
            continue
        grad, weight = flat.grad.narrow(0, f.hp_start, f.numel), flat.narrow(0, f.hp_start, f.numel)
        if stepper != partition.rank:
            peer = _global(partition, stepper)
            partition.bytes_sent += grad.numel() * grad.element_size() + weight.numel() * weight.element_size()
            ops.append(dist.P2POp(dist.isend, partition.to_wire(grad), peer, partition.group, f.index))
            ops.append(dist.P2POp(dist.isend, partition.to_wire(weight.detach()), peer, partition.group, f.index))
            partition.pending.append(("recv", f.index, stepper, None, weight.detach()))
            continue
        parts = pieces[f.index] = [(f.lp_start, grad, weight.detach())]
        for r, lp_start, numel in partition.owners[f.index]:
            if r == partition.rank:
                continue
            device = partition.wire or grad.device
            g = torch.empty(numel, dtype=grad.dtype, device=device)
            w = torch.empty(numel, dtype=weight.dtype, device=device)
            parts.append((lp_start, g, w))
            ops.append(dist.P2POp(dist.irecv, g, _global(partition, r), partition.group, f.index))
            ops.append(dist.P2POp(dist.irecv, w, _global(partition, r), partition.group, f.index))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    full = {}
    for index, parts in pieces.items():
        shape = matrices[index].shape
        g = torch.empty(shape.numel(), dtype=parts[0][1].dtype, device=parts[0][1].device)
        w = torch.empty(shape.numel(), dtype=parts[0][2].dtype, device=parts[0][2].device)
        for lp_start, gp, wp in parts:
            g.narrow(0, lp_start, gp.numel()).copy_(gp)
            w.narrow(0, lp_start, wp.numel()).copy_(wp)
        full[index] = (g.view(shape), w.view(shape))
        lp_start, _, mine = parts[0]
        partition.pending.append(("copy", index, partition.rank, w.narrow(0, lp_start, mine.numel()), mine))
        for r, lp_start, numel in partition.owners[index]:
            if r != partition.rank:
                partition.pending.append(("send", index, r, w.narrow(0, lp_start, numel), None))
    return full


def partition_slots(flat: Tensor, partition: Partition, matrices: list, context_of) -> list[Slot]:
    """The slots of the matrices this rank steps in one flat partition (whose gradient is ``flat.grad``), after the
    exchange that brings the straddlers it steps their whole gradient and weight."""
    partition.wire = wire(partition.group, flat)
    full = _gather_to_steppers(partition, flat, matrices)
    slots = []
    for f in partition.fragments:
        if not partition.steps(f.index):
            continue
        shape, context = matrices[f.index].shape, context_of(f.index)
        if f.index in full:  # a straddler stepped here, whole
            grad, weight = full[f.index]
            slots.append(Slot(f.index, grad, weight, context=context))
            continue
        grad = flat.grad.narrow(0, f.hp_start, f.numel)
        target = flat.narrow(0, f.hp_start, f.numel)
        if f.numel == shape.numel():
            slots.append(Slot(f.index, grad.view(shape), target.view(shape), context=context))
        else:
            slots.append(Slot(f.index, grad, target, fragment=True, context=context))
    return slots
