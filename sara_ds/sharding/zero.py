"""ZeRO partitions: a param group flattened and cut into one contiguous piece per data-parallel rank, mapped back to
matrices. Engine-agnostic: ``integrations.deepspeed`` finds each rank's ``Fragment``s from DeepSpeed's own links,
and this module does the rest.

A matrix wholly inside this rank's partition is a zero-copy view of the flat gradient. A matrix that straddles a
partition boundary ("straddler") and needs its whole gradient (projected matrices, non-elementwise bases) is
stepped by one of the ranks holding a piece of it, its *stepper* (``choose_steppers``, balancing refresh cost):
the other holders send it their pieces of the gradient, point to point, and take their pieces of the update back
after the step (``Partition.finish``). No rule reads the weight except the decoupled decay, which is elementwise,
so the stepper steps zeros where it lacks the weight and decays only its own pieces (``Slot.weights``), and each
holder adds what comes back to its piece and decays it the same way: the same floating-point operations as one
process, and 8 bytes per element the stepper does not hold, not 12 with the weight both ways. Only the stepper keeps the
matrix's state, so the low-rank state is partitioned across DP ranks the way the parameters are, each matrix's
once. An elementwise base's full-rank straddler is stepped piece by piece where each piece lies.

Under ZeRO-3 every parameter is cut into ``world`` equal pieces (the last padded), rank r holding elements
``[r p, (r+1) p)`` of its flattened tensor, so every matrix is a straddler held by all ranks. Each matrix stepped
whole gets one stepper, the rank holding the least optimizer state so far (``choose_zero3_steppers``):
whole-matrix ownership, as DeepSpeed's own Muon does at stage 3, through the same exchange.

Whole-matrix ownership moves 8 bytes per element a stepper does not hold, every step. So at ZeRO-3 a projected
matrix whose basis is on the column side (a right basis: R = B^T G^T) is stepped in **row blocks** instead
(``row_blocks``): each rank steps the rows that start in its piece, with the shared basis, and only the partial
rows at the piece boundaries move. Its R's columns are then split over the ranks, as a tensor-parallel split of
A's columns: the statistics that span them are summed and the refresh forms the spectrum with
``sharding.tensor_parallel``'s context over the data-parallel group (by default gathered to one rank, chosen
by refresh cost, so the spectrum is one process's). Left-basis matrices, whose R would be a sum over the row
blocks every step, stay whole-matrix owned.
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
    rows: dict = field(default_factory=dict)   # ZeRO-3 matrix stepped in row blocks -> [(first row, end row)] per
                                               # DP rank (``row_blocks``)
    roots: dict = field(default_factory=dict)  # matrix stepped in row blocks -> the DP rank that forms its spectrum
    pending: list = field(default_factory=list)  # (kind, matrix id, peer, new piece, target): for ``finish``
    zero3: bool = False        # a ZeRO-3 sub-group (``build_zero3_layout``)
    wire: object = None        # where the exchange's tensors must be for the group's backend (NCCL: the GPU), if the
                               # partition is elsewhere (``offload_optimizer: cpu``); None: where they are
    bytes_sent: int = 0        # this rank's point-to-point bytes of the straddler exchange, so far

    def steps(self, index: int) -> bool:
        """This rank steps matrix ``index`` (or its piece of it, or its row block)."""
        return index in self.rows or self.steppers.get(index, self.rank) == self.rank

    def blocks(self, index: int, shape) -> list | None:
        """(DP rank, first element, end element) of each part of matrix ``index`` stepped as one: its row blocks,
        or the whole matrix on its stepper; None where each piece is stepped where it lies (or the matrix lies
        whole in one partition)."""
        if index in self.rows:
            cols = shape.numel() // shape[0]
            return [(r, start * cols, stop * cols) for r, (start, stop) in enumerate(self.rows[index])]
        if index in self.steppers:
            return [(self.steppers[index], 0, shape.numel())]
        return None

    def finish(self, decay=None) -> None:
        """After the step: each borrowed piece's update goes from its stepper back to its holder, which adds it to
        its piece and decays that as the step decayed the weights (``decay(pieces)``; None: the step was skipped).
        A stepper's own pieces of a block it assembled are copied back."""
        ops, updates = [], []
        for kind, index, peer, new, target in self.pending:
            if kind == "copy":
                target.copy_(new)
            elif kind == "send":
                tensor = self.to_wire(new)
                self.bytes_sent += tensor.numel() * tensor.element_size()
                ops.append(dist.P2POp(dist.isend, tensor, _global(self, peer), self.group, index))
            else:
                update = torch.empty_like(target, device=self.wire or target.device)
                updates.append((update, target))
                ops.append(dist.P2POp(dist.irecv, update, _global(self, peer), self.group, index))
        self.pending.clear()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for update, target in updates:
            target.add_(update.to(target.device))
        if updates and decay is not None:
            decay([target for _, target in updates])

    def to_wire(self, t: Tensor) -> Tensor:
        return t.contiguous() if self.wire is None else t.to(self.wire).contiguous()


def zero3_piece(numel: int, world: int, rank: int) -> int:
    """Elements of a parameter that ZeRO-3 rank ``rank`` of ``world`` holds: its piece of ``ceil(numel / world)``
    (DeepSpeed's ``partition_numel()``), padding excluded."""
    piece = -(-numel // world)
    return max(0, min(piece, numel - rank * piece))


def row_blocks(rows: int, cols: int, world: int) -> list | None:
    """The rows each of ``world`` ZeRO-3 ranks steps of a rows x cols matrix cut into pieces of
    ``ceil(rows * cols / world)`` elements: those whose first element lies in its piece, [first, end) per rank. None
    where some rank would have none (a row longer than a piece): such a matrix is stepped whole."""
    piece = -(-rows * cols // world)
    out = [(min(rows, -(-r * piece // cols)), min(rows, -(-(r + 1) * piece // cols))) for r in range(world)]
    return out if all(end > first for first, end in out) else None


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


# ``zero3_ownership='auto'`` takes row blocks until the whole-matrix exchange left is at most this share of ZeRO-3's
# own traffic (two all-gathers of the parameters and a reduce-scatter of the gradients per step)
AUTO_EXCHANGE_SHARE = 0.05

# the exchange's bytes per element a block's stepper does not hold: the fp32 gradient in, the fp32 update out
EXCHANGE_BYTES = 8


def affordable_row_blocks(matrices: list, world: int) -> set:
    """``zero3_ownership='auto'``: the matrices to step in row blocks. Each one's basis then sits on every rank
    instead of one (world - 1 more copies), so they are taken in the order that saves the most traffic per element
    of basis (numel / basis: the tallest against r first), while the whole-matrix exchange left is above
    ``AUTO_EXCHANGE_SHARE`` of ZeRO-3's own traffic, and while the optimizer state summed over the ranks stays
    within stock AdamW's (two fp32 moments per element): SARA never holds more optimizer state than the AdamW it
    replaces, and spends its saving only where the exchange is a real cost (small data-parallel sizes)."""
    own = 3 * sum(m.shape.numel() * m.param.element_size() for m in matrices)  # both x (world - 1) / world
    exchanged = EXCHANGE_BYTES * sum(m.shape.numel() for m in matrices if m.whole) / world
    budget = 2 * sum(m.shape.numel() for m in matrices) - sum(m.state_numel for m in matrices)
    chosen = set()
    for m in sorted((m for m in matrices if m.row_blocks and m.basis_numel),
                    key=lambda m: (-m.shape.numel() / m.basis_numel, m.index)):
        if exchanged <= AUTO_EXCHANGE_SHARE * own:
            break
        extra = (world - 1) * m.basis_numel
        if extra <= budget:
            budget -= extra
            exchanged -= EXCHANGE_BYTES * m.shape.numel() / world
            chosen.add(m.index)
    return chosen


def choose_row_blocks(partition: Partition, matrices: list, allowed: set, loads: list, refresh_loads: list) -> None:
    """ZeRO-3: the ``allowed`` matrices that every rank can take whole rows of are stepped in ``row_blocks``
    (``partition.rows``); each one's spectrum is formed on one rank (``partition.roots``), the least loaded by
    refresh cost so far. ``loads`` takes each rank's share of their state, ``refresh_loads`` the spectra (both
    carried from one sub-group to the next)."""
    world = dist.get_world_size(partition.group)
    items = []
    for index, holders in sorted(partition.owners.items()):
        m = matrices[index]
        if world == 1 or index not in allowed or not m.row_blocks or len(holders) != world:
            continue
        blocks = row_blocks(m.shape[0], m.shape.numel() // m.shape[0], world)
        if blocks is None:
            continue
        partition.rows[index] = blocks
        for r, (first, end) in enumerate(blocks):
            loads[r] += m.state_numel * (end - first) // m.shape[0]
        items.append((index, list(range(world)), ownership.refresh_cost(m.shape)))
    partition.roots = ownership.assign_among(items, refresh_loads)
    for index, _, cost in items:
        refresh_loads[partition.roots[index]] += cost


def choose_zero3_steppers(partition: Partition, matrices: list, loads: list) -> dict:
    """ZeRO-3: each matrix stepped whole (not in row blocks) goes to the rank that steps the least optimizer state
    so far, largest first within a sub-group, with ``loads`` carried from one sub-group to the next (DeepSpeed steps
    them in the same order on every rank). Greedy list scheduling: no rank ends above the mean plus one matrix's
    state."""
    items = [(index, [r for r, _, _ in holders], matrices[index].state_numel)
             for index, holders in sorted(partition.owners.items())
             if matrices[index].whole and index not in partition.rows]
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
    """The gradient and fp32 weight of each block this rank steps (``Partition.blocks``: a whole straddler, or a
    row block), flat: a view of the partition where this rank holds all of it, else assembled: the gradient from
    the holders' pieces, point to point, and the weight from this rank's own pieces, zero where it lacks them (the
    step then leaves there the update alone). Each gradient piece held here and stepped elsewhere is sent to its
    stepper; its update's way back, and each borrowed piece's, is queued on ``partition.pending`` for
    ``Partition.finish``."""
    ops, blocks = [], {}
    for f in partition.fragments:
        layout = partition.blocks(f.index, matrices[f.index].shape)
        if layout is None:
            continue
        held_from, held_to = f.lp_start, f.lp_start + f.numel
        grad, weight = flat.grad.narrow(0, f.hp_start, f.numel), flat.narrow(0, f.hp_start, f.numel).detach()
        for r, start, end in layout:
            lo, hi = max(start, held_from), min(end, held_to)
            if r == partition.rank:
                mine = blocks[f.index] = (start, end, [])
                if lo < hi:
                    mine[2].append((lo, grad.narrow(0, lo - held_from, hi - lo), weight.narrow(0, lo - held_from,
                                                                                               hi - lo), None))
                for q, q_from, numel in partition.owners[f.index]:  # the rest of the block, from its holders
                    q_lo, q_hi = max(start, q_from), min(end, q_from + numel)
                    if q == partition.rank or q_lo >= q_hi:
                        continue
                    g = torch.empty(q_hi - q_lo, dtype=grad.dtype, device=partition.wire or grad.device)
                    mine[2].append((q_lo, g, None, q))
                    ops.append(dist.P2POp(dist.irecv, g, _global(partition, q), partition.group, f.index))
            elif lo < hi:
                g = partition.to_wire(grad.narrow(0, lo - held_from, hi - lo))
                partition.bytes_sent += g.numel() * g.element_size()
                ops.append(dist.P2POp(dist.isend, g, _global(partition, r), partition.group, f.index))
                partition.pending.append(("add", f.index, r, None, weight.narrow(0, lo - held_from, hi - lo)))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    out = {}
    for index, (start, end, parts) in blocks.items():
        if len(parts) == 1 and parts[0][3] is None and parts[0][1].numel() == end - start:
            out[index] = parts[0][1], parts[0][2], None  # held here whole: the partition itself, nothing moves
            continue
        g = torch.empty(end - start, dtype=parts[0][1].dtype, device=flat.device)
        w = torch.zeros(end - start, dtype=flat.dtype, device=flat.device)
        own = []
        for lo, gp, wp, holder in parts:
            g.narrow(0, lo - start, gp.numel()).copy_(gp)
            new = w.narrow(0, lo - start, gp.numel())
            if holder is None:
                own.append(new.copy_(wp))
            partition.pending.append(("copy", index, partition.rank, new, wp) if holder is None
                                     else ("send", index, holder, new, None))
        out[index] = g, w, own
    return out


def partition_slots(flat: Tensor, partition: Partition, matrices: list, context_of) -> list[Slot]:
    """The slots of the matrices this rank steps in one flat partition (whose gradient is ``flat.grad``), after the
    exchange that brings each block it steps (a whole straddler, a row block) the pieces it lacks."""
    partition.wire = wire(partition.group, flat)
    blocks = _gather_to_steppers(partition, flat, matrices)
    slots = []
    for f in partition.fragments:
        if not partition.steps(f.index):
            continue
        shape, context = matrices[f.index].shape, context_of(f.index)
        if f.index in blocks:
            grad, weight, own = blocks[f.index]
            rows = None
            if f.index in partition.rows:
                first, end = partition.rows[f.index][partition.rank]
                rows, shape = (first, end, shape[0]), torch.Size((end - first, *shape[1:]))
            slots.append(Slot(f.index, grad.view(shape), weight.view(shape), context=context, rows=rows, weights=own))
            continue
        grad = flat.grad.narrow(0, f.hp_start, f.numel)
        target = flat.narrow(0, f.hp_start, f.numel)
        if f.numel == shape.numel():
            slots.append(Slot(f.index, grad.view(shape), target.view(shape), context=context))
        else:
            slots.append(Slot(f.index, grad, target, fragment=True, context=context))
    return slots
