"""Tensor-parallel (Megatron) weights: spectra of the full matrix from the local shards.

Megatron marks a sharded weight with ``tensor_model_parallel=True`` and
``partition_dim`` (0: column-parallel, rows sharded; 1: row-parallel, columns
sharded). The basis goes on the *unsharded* axis, so projection, the base update
and back-projection are local on every step; only a refresh communicates, and
only small factors.

Write A_i for the local block oriented so that the full matrix is A = [A_1; A_2; ...]
stacked by rows (A_i = G_i for column-parallel, G_i^T for row-parallel). The basis
is made of right singular vectors of A, computed by ``sara_ds.spectral``'s tsqr
(default: all-gathers the min(rows_i, n) x n R factors), gram (all-reduces n x n)
or sketch (all-reduces n x k and k x k), given this group's collectives.

Every TP rank then takes the basis chosen on TP rank 0 (a broadcast of n x r), so all
ranks hold bit-identical bases even where their LAPACKs would differ in the last bit.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import projector, sharding, spectral

TP_SPECTRA = ("tsqr", "gram", "sketch")


# DeepSpeed's AutoTP (LinearLayer, LinearAllreduce) marks weights ``tensor_model_parallel`` and records the
# split axis in this metadata dict rather than in Megatron's ``partition_dim`` attribute.
AUTOTP_META = "ds_autotp_universal_checkpoint_meta"


def partition_dim(param: Tensor):
    """The axis a tensor-parallel weight is split on (0 or 1), from Megatron's or AutoTP's marks; else None."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    dim = getattr(param, "partition_dim", None)
    if dim is None and isinstance(getattr(param, AUTOTP_META, None), dict):
        dim = getattr(param, AUTOTP_META).get("partition_dim")
    return dim if dim in (0, 1) else None


def is_tp_sharded(param: Tensor) -> bool:
    return param.dim() == 2 and partition_dim(param) is not None


def basis_on_left(param: Tensor, rows: int, cols: int, proj_type: str) -> bool:
    if is_tp_sharded(param):
        return partition_dim(param) == 1  # row-parallel: columns are sharded, rows are whole
    return projector.basis_on_left(rows, cols, proj_type)


def refuse_uneven_split(param: Tensor, world: int) -> None:
    """The TP spectra assume equal shards: TSQR gathers equal-sized R factors, the sketch cuts its shared
    test matrix evenly, and ``full_shape`` multiplies. Megatron always splits evenly; AutoTP may not (it
    splits by attention-head grain), and records the unsplit shape. Refuse an uneven split by name rather
    than compute the spectrum of a different matrix."""
    meta = getattr(param, AUTOTP_META, None)
    original = meta.get("original_shape") if isinstance(meta, dict) else None
    dim = partition_dim(param)
    if original is not None and len(original) == 2 and int(original[dim]) != param.shape[dim] * world:
        raise ValueError(
            f"sara_ds: a tensor-parallel weight of local shape {tuple(param.shape)} is an uneven shard of "
            f"{tuple(int(x) for x in original)} (split along dim {dim} over {world} ranks); sara_ds's TP spectra "
            "need equal shards. Choose a tensor-parallel size that divides that dimension (and the head counts), "
            "or leave this weight out of the projected group (exclude=[...]).")


class TensorParallelContext:
    """The shard context of a TP-split matrix: its spectrum, sums and basis broadcast over the TP
    group, and the bytes this rank puts into those collectives."""

    def __init__(self, group, partition_dim: int, method: str = "tsqr", oversample: int = 8, power_iters: int = 2):
        if method not in TP_SPECTRA:
            raise ValueError(f"sara_ds: tp_spectrum must be one of {TP_SPECTRA}, got tp_spectrum={method!r}")
        self.group, self.partition_dim, self.method = group, partition_dim, method
        self.oversample, self.power_iters = oversample, power_iters
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes_sent = 0

    # -- collectives (all byte accounting goes through here)
    def _all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        self.bytes_sent += t.numel() * t.element_size()
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def _all_gather(self, t: Tensor) -> list:
        self.bytes_sent += t.numel() * t.element_size()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out

    def reduce_sum(self, t: Tensor) -> Tensor:
        return self._all_reduce(t)

    batched_spectrum = False  # the spectrum of a TP-split matrix is reduced across ranks one matrix at a time

    @property
    def bank_key(self):
        """Shards split the same way over the same group reduce the same way: a bank of them makes one
        all-reduce where its matrices made one each (its bytes are counted on the first member's context)."""
        return ("tp", id(self.group), self.partition_dim, self.method, self.oversample, self.power_iters)

    def full_shape(self, local_shape):
        rows, cols = local_shape
        return (rows * self.world, cols) if self.partition_dim == 0 else (rows, cols * self.world)

    def synchronize(self, basis: Tensor) -> Tensor:
        self.bytes_sent += basis.numel() * basis.element_size() if self.rank == 0 else 0
        dist.broadcast(basis, src=dist.get_global_rank(self.group, 0), group=self.group)
        return basis

    # -- spectra
    def spectrum(self, matrix: Tensor, left: bool, generator=None, rank: int | None = None):
        if left != (self.partition_dim == 1):
            raise RuntimeError("sara_ds: a tensor-parallel basis must lie on the unsharded axis")
        a = (matrix if self.partition_dim == 0 else matrix.mT).float()
        if self.method == "gram":
            return spectral.gram_eigh(a, self._all_reduce)
        if self.method == "tsqr":
            return spectral.tsqr(a, self._all_gather)
        rows, n = a.shape
        k = spectral.sketch_size(n, rank, self.oversample)
        omega = spectral.sketch_test_matrix(generator, rows * self.world, k)
        omega = omega[self.rank * rows:(self.rank + 1) * rows].to(a)  # this rank's rows of one shared sketch
        return spectral.sketch(a, omega, self.power_iters, self._all_reduce)


def refresh_bytes(method: str, local_rows: int, n: int, rank: int, oversample: int = 8, power_iters: int = 2,
                  root: bool = False, itemsize: int = 4) -> int:
    """Bytes one TP rank puts into collectives at one refresh of one matrix (what ``bytes_sent`` counts).

    A_i is local_rows x n with n the unsharded (basis) side. TP rank 0 also broadcasts the
    chosen n x r basis. (The step's finiteness flag is the optimizer's, once per step, not per refresh.)
    """
    if method == "tsqr":
        spectrum = min(local_rows, n) * n
    elif method == "gram":
        spectrum = n * n
    elif method == "sketch":
        k = min(n, rank + oversample)
        spectrum = n * k * (1 + power_iters) + k * k
    elif method == "gather":  # the baseline: all-gather the gradient shard and decompose it everywhere
        spectrum = local_rows * n
    else:
        raise ValueError(f"sara_ds: unknown method={method!r}")
    return itemsize * (spectrum + (n * rank if root else 0))


def context_for(param: Tensor, tp_group=None, method: str = "tsqr", oversample: int = 8, power_iters: int = 2,
                 cache: dict | None = None, local: str = "svd"):
    """The shard context of one parameter: TP-aware when it is split over a real TP group,
    else a local one with the ``local`` spectrum ('svd' or 'sketch') of the whole matrix.

    ``cache`` (owned by the optimizer, never by the parameter: a process group must not
    ride along when a parameter is pickled) keeps one context, and its byte count, per matrix.
    """
    if tp_group is not None and is_tp_sharded(param) and dist.get_world_size(tp_group) > 1:
        cache = {} if cache is None else cache
        key = (id(param), id(tp_group), method, oversample, power_iters)
        if key not in cache:
            refuse_uneven_split(param, dist.get_world_size(tp_group))
            cache[key] = TensorParallelContext(tp_group, partition_dim(param), method, oversample, power_iters)
        return cache[key]
    return sharding.local_context(local, oversample, power_iters)
