"""SARA under Megatron's distributed optimizer: whole matrices per data-parallel rank.

``get_sara_megatron_optimizer`` comes here when ``OptimizerConfig.use_distributed_optimizer``
is set. The chain (SARA for the projected matrices, Megatron's Adam for the rest) is handed
to megatron-core's own ``LayerWiseDistributedOptimizer``, which keeps on each DP rank only
the parameters that rank owns (their fp32 masters, their state), steps them, and
all-gathers the updated parameters. Two things differ from its defaults:

* **ownership** (``sharding.ownership``): projected matrices are balanced by refresh cost,
  the rest by size, instead of megatron-core's ping-pong by size; the balance is printed
  once;
* **the all-gather** pads every rank's shard to the largest one and makes one
  ``all_gather_into_tensor``: megatron-core's uneven ``all_gather`` runs on NCCL only.

Gradients are all-reduced (``DistributedDataParallelConfig(use_distributed_optimizer=False)``), where
Megatron's own distributed optimizer reduce-scatters them. megatron-core >= 0.19 can lay the DDP buffers out
so that a reduce-scatter hands each rank the whole, reduced gradients of the parameters it owns
(``shard_aligned_layout``, passed to ``DistributedDataParallel(..., full_param_layout=)``). There ownership
follows that layout (its shards, packed by size) and the updated parameters return through DDP's own buffer
all-gather: the traffic of Megatron's distributed optimizer.

Checkpoints (``torch_dist``): SARA's state is saved per matrix, at its TP=1 layout
(``megatron_checkpoint``), by the matrix's owner, so a load at another DP or TP size finds
every matrix's state wherever it is owned now. The rest goes through megatron-core's
layer-wise checkpoint code. ``state_dict()`` (``--ckpt-format torch``) is per rank, for a
resume at the same sizes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
from megatron.core.optimizer.optimizer import ChainedOptimizer
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_pg_rank, get_pg_size

from .. import functional
from ..layout import collective_device
from ..sharding import ownership
from .megatron_checkpoint import SaraCheckpoint, model_and_main_params


def supports_shard_aligned_buffers() -> bool:
    """Whether this megatron-core lays DDP buffers out per parameter for the layer-wise optimizer (>= 0.19)."""
    import inspect

    from megatron.core.distributed import DistributedDataParallel

    return (hasattr(LayerWiseDistributedOptimizer, "compute_full_param_layout")
            and "full_param_layout" in inspect.signature(DistributedDataParallel.__init__).parameters)


def shard_aligned_layout(module, ddp_config, data_parallel_size: int | None = None):
    """The DDP buffer layout under which a reduce-scatter hands each data-parallel rank the whole, reduced
    gradients of the parameters it owns (megatron-core >= 0.19's layer-wise layout, every trainable parameter of
    ``module`` tagged for it). Build the model's DDP with it, then SARA's distributed optimizer::

        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True)
        model = DistributedDataParallel(config, ddp_config, module,
                                        full_param_layout=shard_aligned_layout(module, ddp_config))
    """
    from megatron.core import parallel_state

    if not supports_shard_aligned_buffers():
        from importlib.metadata import version

        raise RuntimeError(
            f"sara_ds: megatron-core {version('megatron-core')} has no per-parameter DDP buffer layout "
            "(DistributedDataParallel(full_param_layout=), megatron-core >= 0.19); wrap the model with "
            "DistributedDataParallelConfig(use_distributed_optimizer=False) there: SARA's distributed optimizer "
            "then all-reduces the gradients")
    if not ddp_config.use_distributed_optimizer:
        raise ValueError("sara_ds: shard_aligned_layout is for a reduce-scattered gradient buffer: set "
                         "DistributedDataParallelConfig(use_distributed_optimizer=True), got False")
    dp_cp = data_parallel_size or parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:  # SARA's matrices and Megatron's Adam's parameters alike: every one is owned whole
        p.is_managed_by_layer_wise_optimizer = True
    bucket_size = None  # DistributedDataParallel's own rule: one bucket unless gradient reduction overlaps
    if ddp_config.overlap_grad_reduce:
        bucket_size = ddp_config.bucket_size or max(40000000, 1000000 * parallel_state.get_data_parallel_world_size())
    return LayerWiseDistributedOptimizer.compute_full_param_layout(params, bucket_size, dp_cp, ddp_config)


def shard_aligned(model_chunks) -> bool:
    """Whether every chunk's DDP reduce-scatters into shard-aligned buffers (``shard_aligned_layout``)."""
    layouts = [getattr(chunk, "full_param_layout", None) for chunk in model_chunks]
    return all(layout is not None and all(getattr(key, "is_managed_by_layer_wise_optimizer", False)
                                          for key in layout.layouts) for layout in layouts)


class WholeStepSkip:
    """One found-inf flag for the whole chain: a NaN or Inf in any gradient (an embedding's, under Megatron's own
    Adam) skips every optimizer's step, as SARA skips its own. Megatron checks gradients only under a loss scaler
    (fp16); in bf16 the rest of the chain would apply the NaN. Agreed over the gradient-statistics group (TP x PP)
    and, where ranks own different parameters (``owner_group``), over those too."""

    owner_group = None

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found = super().prepare_grads()  # grads into the main (fp32) copies, and the loss scaler's own check
        grads = [p.grad for opt in self.chained_optimizers for p in opt.get_parameters() if p.grad is not None]
        nonfinite = functional.nonfinite(grads, on_device=False)
        if bool(nonfinite):  # the 2-norms say so: tell an overflowing square from a NaN or Inf
            nonfinite = functional.nonfinite(grads, on_device=False, exact=True)
        flag = nonfinite.reshape(1).to(grads[0].device if grads else "cpu")
        for group in (self.chained_optimizers[0].get_grad_stats_parallel_group(), self.owner_group):
            if group is not None and get_pg_size(group) > 1:
                flag = flag.to(collective_device(group))
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return found or bool(flag.max() > 0)


class SaraChainedOptimizer(WholeStepSkip, ChainedOptimizer):
    """megatron-core's ChainedOptimizer (SARA first, Megatron's Adam for the rest), skipping whole steps as one."""


class SaraLayerWiseOptimizer(WholeStepSkip, LayerWiseDistributedOptimizer):
    """megatron-core's layer-wise distributed optimizer with SARA first in its chain."""

    def __init__(self, optimizers, config, pg_collection, sara_inner, names: dict, gated: set, model_chunks=None):
        self.names = names  # id(model parameter) -> its name
        self.sara_inner = sara_inner
        # the bf16 wrappers made after sharding need each optimizer's state initialiser for torch_dist loads
        init_state_fns = [getattr(opt, "init_state_fn", None) or _no_state for opt in optimizers]
        if config.bf16:  # megatron-core makes the bf16 wrappers itself, after sharding (>= 0.19 wants raw ones)
            optimizers = [getattr(opt, "optimizer", opt) for opt in optimizers]
        # with shard-aligned buffers megatron-core reads their layouts from the chunks and all-gathers the
        # updated parameters through DDP's buffers
        chunks = dict(model_chunks=model_chunks) if model_chunks and shard_aligned(model_chunks) else {}
        super().__init__(optimizers, config, pg_collection, init_state_fns, **chunks)
        self.checkpoint = SaraCheckpoint(sara_inner, self._sara_pairs_by_group, names, gated, owned_by_one_dp_rank=True)
        dp = pg_collection.dp_cp
        # a step that one owner skips on a non-finite gradient must be skipped by every owner
        sara_inner.layout.owner_group = self.owner_group = dp if get_pg_size(dp) > 1 else None
        for model_params, mains in self._sara_pairs_by_group():
            if model_params is not mains:
                sara_inner.layout.alias(mains, model_params)

    # ------------------------------------------------------------ ownership

    def shard_params(self, optimizers, full_param_layouts=None):
        dp = self.pg_collection.dp_cp
        size = get_pg_size(dp)
        groups = [g for opt in optimizers for g in opt.param_groups]
        if any(g.get("is_expert_parallel", False) and g["params"] for g in groups):
            raise ValueError("sara_ds: the distributed optimizer does not support expert-parallel parameters "
                             "(is_expert_parallel=True) yet; drop use_distributed_optimizer for MoE models")
        self.dp_cp_params_list = self.expt_dp_params_list = None
        members = [(p, gi) for gi, g in enumerate(groups) for p in g["params"]]
        items = [ownership.Item(p.numel(), tuple(p.shape), "rank" in groups[gi] and p.dim() == 2) for p, gi in members]
        if full_param_layouts is not None:  # shard-aligned buffers: a parameter's owner is the shard it lies in
            super().shard_params(optimizers, full_param_layouts)
            where = {id(p): r for r, params in enumerate(self.dp_cp_params_list or [[p for p, _ in members]])
                     for p in params}
            owner, rule = [where[id(p)] for p, _ in members], "the reduce-scattered buffer's shards, packed by size"
        else:
            owner, rule = ownership.owners(items, size), "SARA's matrices balanced by refresh cost, the rest by size"
        self.owner_of = {self.names[id(p)]: o for (p, _), o in zip(members, owner)}
        if dist.get_rank() == 0:
            print(f"sara_ds: distributed optimizer, {len(members)} parameters over {size} data-parallel ranks "
                  f"(whole parameters; {rule})\n" + ownership.balance_table(items, owner, size), flush=True)
        if size == 1:
            return
        if full_param_layouts is None:
            me = get_pg_rank(dp)
            self.dp_cp_params_list = [[p for (p, _), o in zip(members, owner) if o == r] for r in range(size)]
            for gi, g in enumerate(groups):
                g["params"] = [p for (p, g_index), o in zip(members, owner) if g_index == gi and o == me]
        sara = self.sara_inner
        sara.layout.owned = {sara.layout.index_of(p) for g in sara.param_groups for p in g["params"]}

    @torch.no_grad()
    def allgather_params(self):
        """Each rank's updated parameters to every rank: one all-gather of equal, padded buffers."""
        if self.dp_cp_params_list is None:
            return
        group = self.pg_collection.dp_cp
        me = get_pg_rank(group)
        shards = self.dp_cp_params_list
        width = max(sum(p.numel() for p in params) for params in shards)
        sample = next(p for params in shards for p in params)
        local = sample.new_zeros(width)
        if shards[me]:
            flat = torch.cat([p.detach().reshape(-1) for p in shards[me]])
            local[:flat.numel()].copy_(flat)
        gathered = sample.new_empty(len(shards) * width)
        dist.all_gather_into_tensor(gathered, local, group=group)
        for rank, params in enumerate(shards):
            offset = rank * width
            for p in params:
                if rank != me:
                    p.detach().copy_(gathered[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    # ------------------------------------------------------------ checkpoints

    def _sara_pairs_by_group(self):
        """(model parameters, the tensors SARA steps for them) per SARA param group."""
        return model_and_main_params(self.chained_optimizers[0], self.sara_inner)

    def _rest(self):
        """The chain without SARA, for megatron-core's own layer-wise checkpoint code."""
        outer = self

        class _Swap:
            def __enter__(self):
                self.saved = outer.chained_optimizers
                outer.chained_optimizers = self.saved[1:]

            def __exit__(self, *exc):
                outer.chained_optimizers = self.saved
        return _Swap()

    def _rest_sharded_state_dict(self, model_sharded_state_dict, is_loading, **kwargs):
        """The rest of the chain through megatron-core's layer-wise checkpoint code. In fp32 that code fails in
        megatron-core 0.16.1 to 0.19.2 (``KeyError: 'optimizer'``: it reads ``sd['optimizer']``, and
        ``FP32Optimizer.sharded_state_dict`` returns the torch optimizer's dict itself), so there its
        post-processing is repeated here for that dict shape; bf16 runs megatron-core's own."""
        with self._rest():
            if self.config.bf16:
                return LayerWiseDistributedOptimizer.sharded_state_dict(self, model_sharded_state_dict, is_loading,
                                                                         **kwargs)
            rest = ChainedOptimizer.sharded_state_dict(self, model_sharded_state_dict, is_loading, **kwargs)
            single = len(self.chained_optimizers) == 1
        for sh_base in nested_values(rest):  # each parameter's state is written by its owner alone
            if hasattr(sh_base, "replica_id"):
                sh_base.replica_id = (0 if isinstance(sh_base.replica_id, int) else (*sh_base.replica_id[:2], 0))
        for sd in ({1: rest} if single else rest).values():
            if not sd["state"]:
                sd["state"] = LocalNonpersistentObject(sd["state"])
            for i, group in enumerate(sd["param_groups"]):
                # a rank that owns nothing in a group has no hyperparameters worth saving; take another's
                local_params = group.pop("params")
                group["params"] = bool(local_params.unwrap())
                every = [None] * dist.get_world_size()
                dist.all_gather_object(every, group)
                chosen = next((g for g in every if g["params"]), group)
                chosen["params"] = local_params
                sd["param_groups"][i] = chosen
        return rest

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        rest = self._rest_sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
        return {"sara": self.checkpoint.sharded_state_dict(is_loading), "rest": rest}

    def load_state_dict(self, state_dict):
        if not (isinstance(state_dict, dict) and "sara" in state_dict):
            # a per-rank state_dict() (torch format), loaded as megatron-core's load_state_dict_from_file does
            return ChainedOptimizer.load_state_dict(self, state_dict)
        with self._rest():
            super().load_state_dict(state_dict["rest"])
        self.checkpoint.load_state_dict(state_dict["sara"])


def _no_state(optimizer, config=None):
    return None


def layer_wise_optimizer(config, optimizers, sara_inner, names, gated, model_chunks=None) -> SaraLayerWiseOptimizer:
    return SaraLayerWiseOptimizer(optimizers, config, ProcessGroupCollection.use_mpu_process_groups(), sara_inner,
                                  names, gated, model_chunks)
