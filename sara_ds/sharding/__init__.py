"""Where a matrix's gradient comes from and where its update goes.

The optimizer iterates ``Slot``s (built by ``placement.Placement``). A slot is one
parameter as the optimizer sees it on this process: its full gradient (or, for
elementwise updates only, a fragment of it), the tensor to update, and its shard context: the
matrix's spectrum at refreshes, the sums over its shards, and its full shape
(``LocalContext`` when it is whole here, ``TensorParallelContext`` when it is split
over tensor-parallel ranks).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import spectral


def shape_of(param: Tensor) -> torch.Size:
    """A parameter's own shape. Under DeepSpeed ZeRO-3 (``deepspeed.zero.Init``, or once an engine has partitioned
    it) the tensor is an empty 1-D stub and the real shape is ``ds_shape``."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def numel_of(param: Tensor) -> int:
    return shape_of(param).numel()


@dataclass(frozen=True)
class LocalContext:
    """The whole matrix is here: nothing is communicated (see tensor_parallel for the sharded case)."""

    method: str = "svd"          # spectral.LOCAL_SPECTRA: "svd", "gram" or "sketch"
    oversample: int = 8
    power_iters: int = 2
    partition_dim = None         # not split over tensor-parallel ranks

    def spectrum(self, matrix: Tensor, left: bool, generator=None, rank=None):
        return spectral.local_spectrum(matrix, left, self.method, generator, rank, self.oversample, self.power_iters)

    def synchronize(self, basis: Tensor) -> Tensor:
        return basis

    def reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def full_shape(self, local_shape):
        return tuple(local_shape)

    @property
    def bank_key(self):
        """Matrices whose contexts share this key may be stepped as one bank (``sara_ds.banks``)."""
        return self

    @property
    def batched_spectrum(self) -> bool:
        """``spectrum`` takes a [k, m, n] stack at once (the SVD and gram-eigh; the sketch draws per matrix)."""
        return self.method != "sketch"


LOCAL = LocalContext()


@functools.lru_cache(maxsize=None)
def local_context(method: str = "svd", oversample: int = 8, power_iters: int = 2) -> LocalContext:
    return LOCAL if method == "svd" else LocalContext(method, oversample, power_iters)


@dataclass
class Slot:
    index: int                       # stable matrix id (position in the optimizer's original parameter order)
    grad: Optional[Tensor]           # full gradient in the parameter's shape, or a 1-D fragment if ``fragment``
    target: Tensor                   # what the update is added to (param, fp32 master, partition slice, or a
                                     # ZeRO straddler's gathered full weight: ``zero``), shaped like ``grad``
    state: dict                      # this matrix's optimizer state
    fragment: bool = False           # a piece of a matrix stepped piece by piece (elementwise full-rank only)
    context: LocalContext = LOCAL    # or a TensorParallelContext


def plain_slots(params, indices, state, context_for) -> list[Slot]:
    return [Slot(i, p.grad, p, state[p], context=context_for(p)) for p, i in zip(params, indices)]
