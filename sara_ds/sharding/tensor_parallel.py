"""Tensor-parallel (Megatron) weights: which side the basis goes on and how spectra are reduced.

Megatron marks a sharded weight with ``tensor_model_parallel=True`` and
``partition_dim`` (0: column-parallel, rows sharded; 1: row-parallel, columns
sharded). The basis goes on the *unsharded* axis, so projection, the base update
and back-projection are local on every step and only refreshes communicate.
"""
from __future__ import annotations

from torch import Tensor

from .. import projector
from .. import sharding


def is_tp_sharded(param: Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False)) and getattr(param, "partition_dim", -1) in (0, 1)


def basis_on_left(param: Tensor, rows: int, cols: int, proj_type: str) -> bool:
    if is_tp_sharded(param):
        return param.partition_dim == 1  # row-parallel: columns are sharded, rows are whole
    return projector.basis_on_left(rows, cols, proj_type)


def spectral_for(param: Tensor):
    return sharding.LOCAL
