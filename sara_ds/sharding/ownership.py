"""Whole-matrix ownership over data-parallel ranks: which rank steps which parameter.

A distributed optimizer that gives each rank whole parameters (megatron-core's
``LayerWiseDistributedOptimizer``) spends a rank's time on its matrices' refreshes,
and its memory on their state and fp32 masters. A refresh of an m×n matrix costs a
decomposition of ~max(m, n)·min(m, n)², which dwarfs every ordinary step between two
refreshes, so projected matrices are balanced by that cost and the rest by size.

Pure functions of local shapes: every rank computes the same assignment without
communicating, and tensor-parallel peers, whose shards have the same local shapes,
own the same matrices (their refreshes all-reduce with each other).
"""
from __future__ import annotations

from dataclasses import dataclass


def refresh_cost(shape) -> int:
    """≈ flops of an SVD or gram-eigh of a matrix of this shape (its largest dim times the smallest squared)."""
    m, n = int(shape[0]), int(shape[-1])
    return max(m, n) * min(m, n) ** 2


def assign(costs: list, ranks: int) -> list[int]:
    """Longest-processing-time first: the costliest item goes to the least-loaded rank (ties: lowest rank,
    then the earlier item), so the largest load is at most the mean plus one item. Deterministic."""
    loads = [0] * ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        owner[i] = rank
        loads[rank] += costs[i]
    return owner


@dataclass(frozen=True)
class Item:
    numel: int
    shape: tuple
    projected: bool


def owners(items: list[Item], ranks: int) -> list[int]:
    """Owner of each item: projected matrices balanced by refresh cost, the rest by numel, each on its own."""
    out = [0] * len(items)
    for projected, cost in ((True, lambda it: refresh_cost(it.shape)), (False, lambda it: it.numel)):
        chosen = [i for i, it in enumerate(items) if it.projected == projected]
        for i, rank in zip(chosen, assign([cost(items[i]) for i in chosen], ranks)):
            out[i] = rank
    return out


def balance_table(items: list[Item], owner: list[int], ranks: int) -> str:
    """The per-rank balance, printed once at start-up."""
    total_cost = sum(refresh_cost(it.shape) for it in items if it.projected) or 1
    total_numel = sum(it.numel for it in items) or 1
    lines = [f"{'dp rank':>7} {'matrices':>8} {'refresh cost':>12} {'other params':>12} {'params':>8}"]
    for r in range(ranks):
        mine = [it for it, o in zip(items, owner) if o == r]
        lines.append(f"{r:>7} {sum(it.projected for it in mine):>8} "
                     f"{100 * sum(refresh_cost(it.shape) for it in mine if it.projected) / total_cost:>11.1f}% "
                     f"{sum(not it.projected for it in mine):>12} "
                     f"{100 * sum(it.numel for it in mine) / total_numel:>7.1f}%")
    return "\n".join(lines)


def assign_among(items: list, loads: list) -> dict:
    """Each item ``(id, candidate ranks, cost)`` to the least-loaded of its own candidates, costliest first (ties:
    lower rank, then the smaller id), starting from ``loads``. ZeRO-1/2 straddlers: the candidates are the ranks
    holding a piece. Deterministic."""
    loads, out = list(loads), {}
    for index, ranks, cost in sorted(items, key=lambda it: (-it[2], it[0])):
        rank = min(ranks, key=lambda r: (loads[r], r))
        out[index] = rank
        loads[rank] += cost
    return out
