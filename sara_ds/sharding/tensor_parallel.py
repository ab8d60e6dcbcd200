"""Tensor parallelism: a matrix split over TP ranks, and the layout of an optimizer whose weights are so split.

Megatron marks a sharded weight with ``tensor_model_parallel=True`` and ``partition_dim`` (0: column-parallel,
rows split; 1: row-parallel, columns split); DeepSpeed's AutoTP marks it ``tensor_model_parallel`` and records the
axis in its metadata (``split_axis_of_marked``: the one place that reads these marks).

In the canonical orientation (``projector``) A is G for a left basis and G^T for a right one, and the basis
spans A's rows. Which of A's axes the split falls on decides what crosses ranks:

* A's **columns** split (the basis on the whole axis): R = B^T A_i is this rank's columns of R, so projection,
  base update and back-projection are local; the statistics that span a row of R (Adafactor's, Fira's norm) are
  summed over the group. A refresh forms the spectrum of A from the shards with ``spectral``'s tsqr (all-gathers
  the R factors), gram (all-reduces n x n) or sketch (all-reduces n x k and k x k).
* A's **rows** split (the basis on the split axis): R = sum_i B_i^T A_i is one all-reduce of r x (A's columns)
  per step, after which every rank holds all of R and steps the same moments; each updates its rows of W with
  its rows of B. A refresh all-gathers the matrix and forms its spectrum as one process does.

Which side a basis goes on is one process's choice by default (``tp_side='same'``), so TP runs the same algorithm
at every TP size; ``tp_side='unsplit'`` always puts it on the whole axis. Every TP rank then takes the basis
chosen on TP rank 0 (a broadcast), so all hold bit-identical bases even where their LAPACKs differ in the last bit.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import spectral
from ..layout import Layout, collective_device, local_context

# DeepSpeed's AutoTP (LinearLayer, LinearAllreduce) marks weights ``tensor_model_parallel`` and records the
# split axis in this metadata dict rather than in Megatron's ``partition_dim`` attribute.
AUTOTP_META = "ds_autotp_universal_checkpoint_meta"


def split_axis_of_marked(param: Tensor):
    """The axis a tensor-parallel weight is split on (0 or 1), from Megatron's or AutoTP's marks; else None."""
    if not getattr(param, "tensor_model_parallel", False) or param.dim() != 2:
        return None
    dim = getattr(param, "partition_dim", None)
    if dim is None and isinstance(getattr(param, AUTOTP_META, None), dict):
        dim = getattr(param, AUTOTP_META).get("partition_dim")
    return dim if dim in (0, 1) else None


def refuse_uneven_split(param: Tensor, world: int) -> None:
    """The TP spectra assume equal shards: TSQR gathers equal-sized R factors, the sketch cuts its shared
    test matrix evenly, and ``full_shape`` multiplies. Megatron always splits evenly; AutoTP may not (it
    splits by attention-head grain), and records the unsplit shape. Refuse an uneven split by name rather
    than compute the spectrum of a different matrix."""
    meta = getattr(param, AUTOTP_META, None)
    original = meta.get("original_shape") if isinstance(meta, dict) else None
    dim = split_axis_of_marked(param)
    if original is not None and len(original) == 2 and int(original[dim]) != param.shape[dim] * world:
        raise ValueError(
            f"sara_ds: a tensor-parallel weight of local shape {tuple(param.shape)} is an uneven shard of "
            f"{tuple(int(x) for x in original)} (split along dim {dim} over {world} ranks); sara_ds's TP spectra "
            "need equal shards. Choose a tensor-parallel size that divides that dimension (and the head counts), "
            "or leave this weight out of the projected group (exclude=[...]).")


class TensorParallelContext:
    """The shard context of a matrix split over a group's ranks (TP shards; ZeRO-3's row blocks over the DP group):
    its spectrum, sums and basis broadcast over the group, and the bytes this rank puts into those collectives.

    ``counts``: each rank's size along ``split_axis`` where they differ (ZeRO-3's row blocks; TP splits evenly).
    ``root``: the group rank whose basis every rank takes. ``method='gather'`` gathers the matrix to the root, which
    forms one process's spectrum of it (the other ranks form none): exact, for the cost of one gradient per refresh."""

    batched_spectrum = False  # reduced across ranks one matrix at a time

    def __init__(self, group, split_axis: int, method: str = "tsqr", oversample: int = 8, power_iters: int = 2,
                 whole=None, counts=None, root: int = 0):
        if method not in spectral.TP_SPECTRA + ("gather",):
            raise ValueError(f"sara_ds: tp_spectrum must be one of {spectral.TP_SPECTRA}, got tp_spectrum={method!r}")
        self.group, self.split_axis, self.method = group, split_axis, method
        self.oversample, self.power_iters = oversample, power_iters
        self.whole = whole or local_context()  # the spectrum of the gathered matrix (A's rows split)
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.counts = tuple(counts) if counts is not None else None
        self.root = root
        self.bytes_sent = 0
        self._device = None  # where the group's collectives take tensors (``layout.collective_device``)

    def _offset(self, size: int) -> int:
        """This rank's first index along the split axis (``size``: its own count there)."""
        return sum(self.counts[:self.rank]) if self.counts is not None else self.rank * size

    def _gather_along(self, t: Tensor, dim: int) -> Tensor:
        """Every rank's ``t``, concatenated along ``dim`` (each rank's size there is its count)."""
        if self.counts is None:
            return torch.cat(self.all_gather(t), dim=dim)
        return self._joined(self.all_gather(self._padded(t, dim)), dim)

    def _padded(self, t: Tensor, dim: int) -> Tensor:
        """``t`` zero-padded along ``dim`` to the largest rank's count: collectives move equal-sized tensors."""
        size = max(self.counts) if self.counts is not None else t.shape[dim]
        padded = t.new_zeros((*t.shape[:dim], size, *t.shape[dim + 1:]))
        padded.narrow(dim, 0, t.shape[dim]).copy_(t)
        return padded

    def _joined(self, pieces: list, dim: int) -> Tensor:
        """``_padded`` pieces, one per rank, cut back to each rank's count and concatenated along ``dim``."""
        counts = self.counts or (pieces[0].shape[dim],) * self.world
        return torch.cat([p.narrow(dim, 0, c) for p, c in zip(pieces, counts)], dim=dim)

    # -- collectives (all byte accounting goes through here). NCCL moves GPU tensors only: a matrix held on the
    # CPU (a ZeRO partition offloaded there) crosses through the current GPU.
    def _wire(self, t: Tensor) -> Tensor:
        if self._device is None:
            self._device = collective_device(self.group)
        return t if t.device == self._device else t.to(self._device)

    def _all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        self.bytes_sent += t.numel() * t.element_size()
        wire = self._wire(t)
        dist.all_reduce(wire, op=op, group=self.group)
        return t if wire is t else t.copy_(wire)

    def all_gather(self, t: Tensor) -> list:
        self.bytes_sent += t.numel() * t.element_size()
        wire = self._wire(t.contiguous())
        out = [torch.empty_like(wire) for _ in range(self.world)]
        dist.all_gather(out, wire, group=self.group)
        return out if wire.device == t.device else [o.to(t.device) for o in out]

    def reduce_sum(self, t: Tensor) -> Tensor:
        return self._all_reduce(t)

    def reduce_max(self, t: Tensor) -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def rows_split(self, left: bool) -> bool:
        """A's rows are split: a left basis of a column-parallel matrix, a right one of a row-parallel one."""
        return left == (self.split_axis == 0)

    def columns_split(self, left: bool) -> bool:
        return not self.rows_split(left)

    def local_rows(self, basis: Tensor, left: bool) -> Tensor:
        if not self.rows_split(left):
            return basis
        rows = self.counts[self.rank] if self.counts is not None else basis.shape[-2] // self.world
        return basis.narrow(-2, self._offset(rows), rows)

    def gather_rows(self, t: Tensor, left: bool) -> Tensor:
        return self._gather_along(t, t.dim() - 2) if self.rows_split(left) else t

    @property
    def bank_key(self):
        """Shards split the same way over the same group reduce the same way: a bank of them makes one
        collective where its matrices made one each (its bytes are counted on the first member's context)."""
        return ("tp", id(self.group), self.split_axis, self.method, self.oversample, self.power_iters, self.whole,
                self.counts, self.root)

    def full_shape(self, local_shape):
        rows, cols = local_shape
        split = sum(self.counts) if self.counts is not None else (rows if self.split_axis == 0 else cols) * self.world
        return (split, cols) if self.split_axis == 0 else (rows, split)

    def synchronize(self, basis: Tensor) -> Tensor:
        self.bytes_sent += basis.numel() * basis.element_size() if self.rank == self.root else 0
        wire = self._wire(basis)
        dist.broadcast(wire, src=dist.get_global_rank(self.group, self.root), group=self.group)
        return basis if wire is basis else basis.copy_(wire)

    # -- spectra
    def spectrum(self, matrix: Tensor, left: bool, generator=None, rank: int | None = None):
        """(sigma, vectors) of the whole matrix; None on the ranks other than the root under ``method='gather'``
        (they take the root's basis at ``synchronize``)."""
        if self.method == "gather":
            whole = self._gather_to_root(matrix)
            return self.whole.spectrum(whole, left, generator, rank) if whole is not None else None
        if self.rows_split(left):  # the whole matrix, and one process's spectrum of it
            return self.whole.spectrum(self._gather_along(matrix, self.split_axis), left, generator, rank)
        a = (matrix if self.split_axis == 0 else matrix.mT).float()  # the split rows of A^T, stacked over ranks
        if self.method == "gram":
            return spectral.gram_eigh(a, self._all_reduce)
        if self.method == "tsqr":
            height = max(min(c, a.shape[1]) for c in self.counts) if self.counts is not None else None
            return spectral.tsqr(a, self.all_gather, height)
        rows, n = a.shape
        k = spectral.sketch_size(n, rank, self.oversample)
        total = sum(self.counts) if self.counts is not None else rows * self.world
        omega = spectral.sketch_test_matrix(generator, total, k)
        start = self._offset(rows)
        omega = omega[start:start + rows].to(a)  # this rank's rows of one shared sketch
        return spectral.sketch(a, omega, self.power_iters, self._all_reduce)

    def _gather_to_root(self, matrix: Tensor):
        """The whole matrix on the root (None elsewhere): each rank's piece, padded to the largest, one gather."""
        padded = self._padded(matrix, self.split_axis)
        if self.rank != self.root:
            self.bytes_sent += padded.numel() * padded.element_size()
        wire = self._wire(padded)
        pieces = [torch.empty_like(wire) for _ in range(self.world)] if self.rank == self.root else None
        dist.gather(wire, pieces, dst=dist.get_global_rank(self.group, self.root), group=self.group)
        return None if pieces is None else self._joined(pieces, self.split_axis).to(matrix.device)


class TensorParallelLayout(Layout):
    """Parameters (or master copies) whose TP-split weights carry Megatron's or AutoTP's marks, split over
    ``tp_group``: the layout of Megatron without its distributed optimizer, and of DeepSpeed's TP at ZeRO-0."""

    def __init__(self, tp_group=None):
        super().__init__()
        self.tp_group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
        self._contexts: dict = {}  # one per matrix and spectrum choice (never on the parameter: a process
                                   # group must not ride along when a parameter is pickled)

    def split_axis_of(self, param: Tensor):
        return split_axis_of_marked(param) if self.tp_group is not None else None

    def full_shape_of(self, param: Tensor) -> torch.Size:
        shape, axis = self.shape_of(param), self.split_axis_of(param)
        if axis is None:
            return shape
        return torch.Size(d * dist.get_world_size(self.tp_group) if i == axis else d for i, d in enumerate(shape))

    def context(self, index: int, group: dict):
        whole = super().context(index, group)
        axis = self.split_axis_of(self.matrices[index].param)
        if axis is None:
            return whole
        key = (index, group["tp_spectrum"], group["sketch_oversample"], group["sketch_power_iters"], whole)
        if key not in self._contexts:
            refuse_uneven_split(self.matrices[index].param, dist.get_world_size(self.tp_group))
            self._contexts[key] = TensorParallelContext(self.tp_group, axis, *key[1:4], whole=whole)
        return self._contexts[key]

    def step_groups(self) -> list:
        return [self.tp_group] if self.tp_group is not None else []

    def bytes_sent(self) -> dict:
        return {"tensor_parallel": sum(c.bytes_sent for c in self._contexts.values())}


def refresh_bytes(method: str, local_rows: int, n: int, rank: int, oversample: int = 8, power_iters: int = 2,
                  root: bool = False, itemsize: int = 4) -> int:
    """Bytes one TP rank puts into collectives at one refresh of one matrix (what ``bytes_sent`` counts).

    A_i is local_rows x n with n the unsharded (basis) side. TP rank 0 also broadcasts the
    chosen n x r basis. (The step's finiteness flag is the optimizer's, once per step, not per refresh.)
    ``gather``: the whole matrix all-gathered (also what a basis on the split side costs at a refresh).
    """
    if method == "tsqr":
        spectrum = min(local_rows, n) * n
    elif method == "gram":
        spectrum = n * n
    elif method == "sketch":
        k = min(n, rank + oversample)
        spectrum = n * k * (1 + power_iters) + k * k
    elif method == "gather":
        spectrum = local_rows * n
    else:
        raise ValueError(f"sara_ds: unknown method={method!r}")
    return itemsize * (spectrum + (n * rank if root else 0))


# -- a TP shard's state in one process's layout, and back: what a checkpoint that reshards across TP sizes stores

# state entries shaped [..., columns of R]: split over TP ranks where R's columns are (the basis on the whole axis)
SPLIT_STATE = frozenset({"exp_avg", "exp_avg_sq", "exp_avg_sq_col", "v_block"})


def shard_state_layout(state: dict, ctx: TensorParallelContext) -> tuple[dict, bool]:
    """How one TP rank's state of a matrix relates to one process's: {key: the dim it is cut along over the TP
    group} (keys absent are the same on every rank), and whether the rank holds it transposed.

    * projected: R's column statistics, where R's columns are split; everything else (the basis, the rank-axis
      statistics) is whole on every rank;
    * full-rank Adafactor puts the split axis on its columns (``functional.full_rank_step``), so a column-parallel
      matrix's moments are held transposed, with row and column statistics swapped;
    * full-rank Adam-mini (row-parallel only) keeps per-row blocks: split with the rows."""
    if "basis" in state:
        return ({k: -1 for k in SPLIT_STATE if k in state} if ctx.columns_split(state["left"]) else {}), False
    if "exp_avg_sq_row" in state:
        return {k: -1 for k in ("exp_avg", "exp_avg_sq_col") if k in state}, ctx.split_axis == 0
    return {k: ctx.split_axis for k in ("exp_avg", "v_block") if k in state}, False


def _transposed(state: dict) -> dict:
    out = dict(state, exp_avg_sq_row=state["exp_avg_sq_col"], exp_avg_sq_col=state["exp_avg_sq_row"])
    if "exp_avg" in state:
        out["exp_avg"] = state["exp_avg"].mT.contiguous()
    return out


def to_one_process(state: dict, ctx: TensorParallelContext) -> dict:
    """This rank's state of a TP-split matrix as one process would hold it (collective over the TP group: every
    TP rank holding the matrix calls it, in the same matrix order)."""
    split, transposed = shard_state_layout(state, ctx)
    out = {k: torch.cat(ctx.all_gather(v), dim=split[k]) if k in split else v for k, v in state.items()}
    return _transposed(out) if transposed else out


def from_one_process(state: dict, ctx: TensorParallelContext) -> dict:
    """``to_one_process``'s inverse: this TP rank's piece of one process's state (no communication)."""
    split, transposed = shard_state_layout(state, ctx)
    state = _transposed(state) if transposed else state
    return {k: v.chunk(ctx.world, dim=split[k])[ctx.rank].clone() if k in split else v for k, v in state.items()}
