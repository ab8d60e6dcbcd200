"""The boundary between the optimizer and the engines: where each matrix lives, declared by an engine adapter.

The optimizer knows its matrices by a stable id, their position in the parameter order it was built with
(``Matrix``), and keeps each one's state under that id in every mode. What it does not know is where an
engine put them: in the parameters themselves, in fp32 master copies, in a ZeRO flat partition, split over
tensor-parallel ranks, or owned by another data-parallel rank. An engine adapter says so with a ``Layout``:

* ``bind(matrices)`` once, when the optimizer is built;
* ``slots(group, members)`` at every step and param group: a ``Slot`` per matrix this rank steps, with its
  gradient, the tensor its update goes to, and its shard context (how the whole matrix's spectrum and sums
  are formed from what this rank holds);
* ``step_groups()``: the process groups whose ranks hold other parts of one step, over which the step's
  non-finite flag is agreed;
* ``finish(decay)`` after every step, taken or skipped (a ZeRO straddler's update back to its other holders,
  which add it and decay their pieces with ``decay``);
* ``reset()`` when the engine rebuilt its tensors (a checkpoint load).

This module is the single-process (and DDP) layout: each param group holds the parameters themselves, fp32
master copies registered with ``alias``, or same-shaped copies in order. The adapters that derive from it:
``sharding.tensor_parallel.TensorParallelLayout`` (Megatron's and DeepSpeed's TP marks),
``integrations.deepspeed.DeepSpeedLayout`` (ZeRO-0/1/2/3), ``integrations.megatron_distributed``
(whole matrices per data-parallel rank).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import spectral


@dataclass(frozen=True)
class Matrix:
    """One parameter the optimizer was built with, as a layout needs to know it (``SaraOptimizer.matrices``)."""

    index: int          # stable id: position in the parameter order given at construction
    name: str
    param: Tensor       # the tensor the optimizer was built with
    shape: torch.Size   # its shape as this rank holds it (a TP shard's; ZeRO-3: the real one, not the stub's)
    group: int          # its param group
    whole: bool         # stepped on the whole matrix (projected, or a base whose statistics span it); else elementwise
    state_numel: int    # elements of its optimizer state once stepped
    left: Optional[bool] = None  # the side of its basis (``projector.basis_on_left``); None: not projected
    basis_numel: int = 0         # elements of its basis (0: not projected)
    row_blocks: bool = False     # may be stepped in ZeRO-3 row blocks (``sharding.zero``): projected, a right
                                 # basis, and not OSD (whose basis step sums over every column, each step)
    base: str = ""               # the optimizer's base ('adamw', 'adafactor', 'adam_mini')


@dataclass(frozen=True)
class LocalContext:
    """The shard context of a matrix held whole here: nothing is communicated (``TensorParallelContext`` is the
    split one's). ``rows_split`` / ``columns_split``: whether the rows / columns of the canonical A (G for a
    left basis, G^T for a right one) are split over ranks."""

    method: str = "svd"          # spectral.LOCAL_SPECTRA: "svd", "gram" or "sketch"
    oversample: int = 8
    power_iters: int = 2
    split_axis = None            # the dim a tensor-parallel matrix is split on

    def spectrum(self, matrix: Tensor, left: bool, generator=None, rank=None):
        return spectral.local_spectrum(matrix, left, self.method, generator, rank, self.oversample, self.power_iters)

    def synchronize(self, basis: Tensor) -> Tensor:
        return basis

    def reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def reduce_max(self, t: Tensor) -> Tensor:
        return t

    def full_shape(self, local_shape):
        return tuple(local_shape)

    def rows_split(self, left: bool) -> bool:
        return False

    def columns_split(self, left: bool) -> bool:
        return False

    def local_rows(self, basis: Tensor, left: bool) -> Tensor:
        """The rows of the basis matching this rank's rows of A (all of them here)."""
        return basis

    def gather_rows(self, t: Tensor, left: bool) -> Tensor:
        """Every rank's rows of a tensor laid out like A's rows, stacked (this rank's alone here)."""
        return t

    @property
    def bank_key(self):
        """Matrices whose contexts share this key may be stepped as one bank (``sara_ds.banks``)."""
        return self

    @property
    def batched_spectrum(self) -> bool:
        """``spectrum`` takes a [k, m, n] stack at once (the SVD and gram-eigh; the sketch draws per matrix)."""
        return self.method != "sketch"


LOCAL = LocalContext()


def collective_device(group) -> torch.device:
    """Where a tensor must be for a collective over ``group``: NCCL moves GPU tensors only."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


@functools.lru_cache(maxsize=None)
def local_context(method: str = "svd", oversample: int = 8, power_iters: int = 2) -> LocalContext:
    return LOCAL if method == "svd" else LocalContext(method, oversample, power_iters)


@dataclass
class Slot:
    """One matrix as this rank steps it now."""

    index: int                       # stable matrix id
    grad: Optional[Tensor]           # its gradient in the parameter's shape (a TP shard's), or a 1-D fragment
    target: Tensor                   # what the update is added to (the parameter, a master copy, a partition
                                     # slice, or a ZeRO straddler's gathered whole weight), shaped like ``grad``
    fragment: bool = False           # a piece of a matrix stepped piece by piece (elementwise full-rank only)
    context: object = LOCAL          # LocalContext, or sharding.tensor_parallel.TensorParallelContext
    rows: Optional[tuple] = None     # (first row, end row, rows of the matrix): a row block of it (ZeRO-3), whose
                                     # state holds those rows' part of the moments
    weights: Optional[list] = None   # the views of ``target`` that hold the weight, where not all of it does: a
                                     # stepper's block is zero where other ranks hold the weight, so the step leaves
                                     # there the update alone, which they add to their piece before decaying it


class Layout:
    """The single-process / DDP layout, and the base of every engine adapter's."""

    def __init__(self):
        self.matrices: list[Matrix] = []
        self._index_of: dict = {}

    # -- what the optimizer calls
    def bind(self, matrices: list[Matrix]) -> None:
        self.matrices = matrices
        self._index_of.update({id(m.param): m.index for m in matrices})

    def slots(self, group: dict, members: list[int]) -> list[Slot]:
        """Every matrix of ``members`` this rank steps, with its gradient (None where it has none this step)."""
        params = group["params"]
        if all(id(p) in self._index_of for p in params):
            indices = [self._index_of[id(p)] for p in params]
        elif len(params) == len(members) and all(p.shape == self.matrices[i].shape for p, i in zip(params, members)):
            indices = members  # same-shaped copies in order: an engine's fp32 masters
        else:
            raise RuntimeError(
                f"sara_ds: param group {group.get('sara_group')} holds {len(params)} tensors that are not the "
                f"{len(members)} parameters this optimizer was built with, nor same-shaped copies of them in order: "
                "an engine replaced them without telling the optimizer where they went. Under DeepSpeed build the "
                "optimizer through the config (\"optimizer\": {\"type\": \"SaraAdamW\", ...}); under Megatron use "
                "sara_ds.integrations.megatron.get_sara_megatron_optimizer; otherwise give the optimizer a Layout "
                "(sara_ds.layout) that maps them.")
        return [Slot(i, p.grad, p, context=self.context(i, group)) for p, i in zip(params, indices)]

    def context(self, index: int, group: dict):
        """The shard context of matrix ``index``: here, the whole matrix with the group's ``spectrum``."""
        return local_context(group.get("spectrum", "svd"), group["sketch_oversample"], group["sketch_power_iters"])

    def shape_of(self, param: Tensor) -> torch.Size:
        """A parameter's shape as this rank holds it (ZeRO-3's stubs are 1-D: ``DeepSpeedLayout`` says better)."""
        return param.shape

    def split_axis_of(self, param: Tensor) -> Optional[int]:
        """The dim a parameter is split on over tensor-parallel ranks (None: held whole)."""
        return None

    def full_shape_of(self, param: Tensor) -> torch.Size:
        """The whole matrix's shape (a TP shard's, put back together)."""
        return self.shape_of(param)

    def owns(self, index: int) -> Optional[bool]:
        """Whether this rank steps matrix ``index`` (None: not known until the engine's first step reaches it)."""
        return True

    def step_groups(self) -> list:
        """Process groups over which this rank's gradients differ from its peers' within one step."""
        return []

    def owners_step(self) -> Optional[str]:
        """This layout's name where a whole matrix is stepped by its owning rank alone, else None. Each rank chooses
        the finite flag's path (host or device) from the matrices it steps: with owners, ranks could choose
        differently at a refresh, so the host decides."""
        return None

    def finish(self, decay=None) -> None:
        """After a step: ``decay(targets, group)`` applies the step's decoupled weight decay to weights the layout
        updates itself (a ZeRO straddler's pieces on its other holders); None: the step was skipped."""

    def reset(self) -> None:
        """The engine rebuilt the tensors it hands the optimizer (a checkpoint load)."""

    def adopt(self, param_groups: list) -> "Layout":
        """The layout to step with, asked at every step and load: this one, or, where an engine sharded the parameters
        after the optimizer was built without saying so (FSDP2's DTensors, swapped in by accelerate), its layout."""
        if type(self) is Layout and any(type(p).__name__ == "DTensor" for g in param_groups for p in g["params"]):
            from .integrations import fsdp2

            layout = fsdp2.FSDP2Layout()
            layout.bind(self.matrices)
            return layout
        return self

    def index_of(self, tensor: Tensor) -> int:
        """The matrix id of a parameter the optimizer was built with (or of a copy registered with ``alias``)."""
        try:
            return self._index_of[id(tensor)]
        except KeyError:
            raise KeyError("sara_ds: this tensor is not one of the optimizer's parameters (nor an engine's copy of "
                           "one)") from None

    def export_state(self, states: dict) -> dict:
        """Each matrix's state as ``state_dict`` hands it out (an engine whose checkpointer reshards gets its own
        tensor types)."""
        return states

    def import_state(self, states: dict, param_groups: list, members: list) -> dict:
        """A loaded state (``export_state``'s, perhaps resharded) as this rank keeps it."""
        return states

    # -- what engines call
    def alias(self, copies: list, originals: list) -> None:
        """``copies[i]`` stands for ``originals[i]`` (an engine's fp32 master of a parameter it was given)."""
        for copy, original in zip(copies, originals, strict=True):
            self._index_of[id(copy)] = self._index_of[id(original)]

    def bytes_sent(self) -> dict:
        """Bytes this rank has put into the layout's collectives so far, by kind."""
        return {}
