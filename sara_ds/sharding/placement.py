"""Where each matrix of one optimizer lives, and who shares it: the only distribution the step sees.

``Placement`` is built by the optimizer from the process group it was given (``tp_group``)
and turns a param group, whatever the engine put in it (plain parameters, fp32 master
copies, a ZeRO-1/2 flat partition, a ZeRO-3 sub-group's partition), into ``Slot``s, each carrying the shard context of its
matrix (``LocalContext`` or ``TensorParallelContext``). It owns the caches those need (ZeRO
layouts, one TP context per matrix) and names the process groups whose ranks must agree
on a step (``step_groups``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import Slot, local_context, plain_slots, tensor_parallel, zero


class Placement:
    def __init__(self, original_params: list, tp_group=None):
        self.original_params = original_params
        self.tp_group = tp_group
        self.index_of = {id(p): i for i, p in enumerate(original_params)}
        self.layouts = zero.LayoutCache()
        self.tp_contexts: dict = {}
        self.owner_group = None  # ranks that each step a different subset of the matrices (whole-matrix ownership)

    def alias(self, copies: list, originals: list) -> None:
        """``copies[i]`` stands for ``originals[i]`` (an engine's fp32 master of a parameter it was given)."""
        for copy, original in zip(copies, originals, strict=True):
            self.index_of[id(copy)] = self.index_of[id(original)]

    def clear(self) -> None:
        """Engines rebuild their flat partitions on checkpoint load."""
        self.layouts.clear()

    def context_for(self, param: Tensor, group):
        return tensor_parallel.context_for(param, self.tp_group, group["tp_spectrum"], group["sketch_oversample"],
                                           group["sketch_power_iters"], cache=self.tp_contexts,
                                           local=group.get("spectrum", "svd"))  # older checkpoints lack it

    def slots(self, group, members: list, state, needs_full, state_numel=None) -> list[Slot]:
        params = group["params"]

        def context(p):
            return self.context_for(p, group)

        if all(id(p) in self.index_of for p in params):
            return plain_slots(params, [self.index_of[id(p)] for p in params], state, context)
        if zero.is_flat_partition(params, self.original_params) or zero.is_zero3_partition(params, self.original_params):
            return zero.partition_slots(params, members, self.original_params, state, self.layouts,
                                        needs_full=needs_full, context_for=context, tp_group=self.tp_group,
                                        state_numel=state_numel)
        if len(params) == len(members) and all(p.shape == self.original_params[i].shape for p, i in zip(params, members)):
            return plain_slots(params, members, state, context)  # fp32 master copies, in order
        raise RuntimeError(
            "sara_ds: cannot map the tensors in param group "
            f"{group['sara_group']} back to the model parameters this optimizer was built with. "
            "Supported: plain parameters, same-shaped master copies, DeepSpeed ZeRO stage 1/2 flat partitions and "
            "stage-3 sub-group partitions."
        )

    def finish(self) -> None:
        """After a step (taken or skipped): ZeRO straddlers' new weights back from their steppers."""
        for layout in self.layouts.values():
            layout.finish()

    def step_groups(self) -> list:
        """Process groups over which this optimizer's ranks see different gradients of one step."""
        if not (dist.is_available() and dist.is_initialized()):
            return []
        groups = [self.tp_group] if self.tp_group is not None else []
        groups += [self.owner_group] if self.owner_group is not None else []
        groups += [layout.group for layout in self.layouts.values()]
        unique = {id(g): g for g in groups}  # None (the default group) is one group too
        return [g for g in unique.values() if dist.get_world_size(g) > 1]

    def any_rank(self, flag: Tensor) -> Tensor:
        """``flag`` (0-d, > 0 means true) maxed over every rank that holds another part of this step:
        one 4-byte all-reduce per such group."""
        for group in self.step_groups():
            flag = flag.to(_collective_device(group)).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return flag.max() > 0

    def basis_on_left(self, index: int, rows: int, cols: int, proj_type: str) -> bool:
        return tensor_parallel.basis_on_left(self.original_params[index], rows, cols, proj_type)

    def tp_bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self.tp_contexts.values())

    def zero_bytes_sent(self) -> int:
        """Bytes this rank has sent in the ZeRO straddler exchange (pieces to steppers, new weights back)."""
        return sum(layout.bytes_sent for layout in self.layouts.values())


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
