"""Where a matrix's gradient comes from and where its update goes.

The optimizer iterates ``Slot``s. A slot is one parameter as the optimizer sees
it on this process: its full gradient (or, for elementwise updates only, a
fragment of it), the tensor to update, a function picking this process's part
of a full-shaped update, and the spectral strategy used at refreshes (local SVD,
or a tensor-parallel one that reduces small factors over the TP group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import spectral


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class LocalSpectral:
    """Single-process spectra: nothing is communicated."""

    def spectrum(self, matrix: Tensor, left: bool):
        return spectral.local_spectrum(matrix, left)

    def all_finite(self, grad: Tensor) -> bool:
        return bool(torch.isfinite(grad).all())


LOCAL = LocalSpectral()


@dataclass
class Slot:
    index: int                       # stable matrix id (position in the optimizer's original parameter order)
    grad: Optional[Tensor]           # full gradient in the parameter's shape, or a 1-D fragment if ``fragment``
    target: Tensor                   # what the update is added to (param, fp32 master, partition slice)
    state: dict                      # this matrix's optimizer state
    local: Callable[[Tensor], Tensor] = _identity  # full-shaped update -> the part ``target`` holds
    fragment: bool = False
    spectral: LocalSpectral = LOCAL

    def grad_is_finite(self) -> bool:
        return self.spectral.all_finite(self.grad)

    def spectrum(self, matrix: Tensor, left: bool):
        return self.spectral.spectrum(matrix, left)


def plain_slots(params, indices, state) -> list[Slot]:
    from . import tensor_parallel

    return [Slot(i, p.grad, p, state[p], spectral=tensor_parallel.spectral_for(p)) for p, i in zip(params, indices)]
