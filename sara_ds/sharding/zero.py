"""DeepSpeed ZeRO stage 1/2: flat fp32 partitions back to 2-D matrices.

Under ZeRO-1/2 the inner optimizer's group holds one 1-D fp32 tensor: this DP
rank's slice of the group's flattened parameters. DeepSpeed links every model
parameter to its piece of that slice through ``param._hp_mapping`` (the same
links behind ``deepspeed.utils.safe_get_full_grad``):

    lp_fragment_address.start / .numel   where the piece lies inside param.view(-1)
    hp_fragment_address.start            where it lies inside the flat partition

A parameter wholly inside this rank's partition is a zero-copy 2-D view of the
flat gradient. A parameter that straddles a partition boundary ("straddler")
has its full gradient reassembled by point-to-point exchange between the ranks
that own a piece of it, never across the whole DP group. Every owner then runs
the same deterministic update on the same full gradient and keeps its own
slice. State is stored per owned matrix under ``state[flat][matrix id]``, so the
low-rank state is partitioned across DP ranks the way the parameters are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import Slot


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


def _reassemble(layout: Layout, flat_grad: Tensor, wanted, original_params) -> dict:
    """Full gradients of the straddlers in ``wanted``, exchanged among their owners only."""
    ops, pieces = [], {}
    for f in layout.fragments:
        if f.index not in wanted:
            continue
        mine = flat_grad.narrow(0, f.hp_start, f.numel)
        pieces[f.index] = [(f.lp_start, mine)]
        for r, lp_start, numel in layout.owners[f.index]:
            if r == layout.rank:
                continue
            peer = dist.get_global_rank(layout.group, r) if layout.group is not None else r
            buf = torch.empty(numel, dtype=flat_grad.dtype, device=flat_grad.device)
            pieces[f.index].append((lp_start, buf))
            ops.append(dist.P2POp(dist.isend, mine.contiguous(), peer, layout.group, f.index))
            ops.append(dist.P2POp(dist.irecv, buf, peer, layout.group, f.index))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    full = {}
    for index, parts in pieces.items():
        q = original_params[index]
        g = torch.empty(q.numel(), dtype=flat_grad.dtype, device=flat_grad.device)
        for lp_start, t in parts:
            g.narrow(0, lp_start, t.numel()).copy_(t)
        full[index] = g.view(q.shape)
    return full


def partition_slots(params, members, original_params, state, cache: LayoutCache, needs_full, context_for,
                    tp_group=None) -> list[Slot]:
    slots = []
    for flat in params:
        layout = cache.get(id(flat))
        if layout is None:
            layout = cache[id(flat)] = build_layout(flat, members, original_params, tp_group)
        if flat.grad is None:
            continue
        straddlers = {f.index for f in layout.fragments
                      if f.numel < original_params[f.index].numel() and needs_full(f.index)}
        full = _reassemble(layout, flat.grad, straddlers, original_params)
        root = state[flat]
        owned = {f.index for f in layout.fragments}
        if root and set(root) != owned:
            raise RuntimeError(
                "sara_ds: the loaded optimizer state holds matrices "
                f"{sorted(set(root) - owned)[:8]} that this rank does not own (and lacks {sorted(owned - set(root))[:8]}). "
                "The checkpoint was written with a different data-parallel size or ZeRO partitioning. "
                "sara_ds state is partitioned by matrix ownership: resume at the same data-parallel size and ZeRO stage, "
                "or convert with `python -m sara_ds.ds_to_universal` and load with checkpoint.load_universal=true."
            )
        for f in layout.fragments:
            q = original_params[f.index]
            st = root.setdefault(f.index, {})
            grad = flat.grad.narrow(0, f.hp_start, f.numel)
            target = flat.narrow(0, f.hp_start, f.numel)
            context = context_for(q)
            if f.numel == q.numel():
                slots.append(Slot(f.index, grad.view(q.shape), target.view(q.shape), st, context=context))
            elif f.index in straddlers:
                slots.append(Slot(f.index, full[f.index], target, st, local=_slicer(f), context=context))
            else:
                slots.append(Slot(f.index, grad, target, st, fragment=True, context=context))
    return slots


def _slicer(f: Fragment):
    return lambda update: update.reshape(-1).narrow(0, f.lp_start, f.numel)
