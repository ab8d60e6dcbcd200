"""Megatron-core: SARA for the projected weights, Megatron's own optimizer for everything else.

    from sara_ds.integrations.megatron import get_sara_megatron_optimizer
    optimizer = get_sara_megatron_optimizer(config, model_chunks, rank=256, preset="sara")

returns a ``ChainedOptimizer``: ``FP32Optimizer`` (or ``Float16OptimizerWithFloat16Params``
for bf16) around a TP-aware ``SaraAdamW`` for the 2-D attention/MLP weights, chained
with whatever ``get_megatron_optimizer`` builds for the rest (embeddings, output
layer, norms, biases, experts). It follows megatron-core's own Muon builder: the
parameters of one side are frozen while the other side's groups are built, so
both carry the keys Megatron's LR scheduler reads (max_lr, min_lr, wd_mult, ...).
Adam betas and eps come from the ``OptimizerConfig``, so ``--optimizer adam``
flags keep their meaning.

Checkpoints: ``--ckpt-format torch`` saves each rank's ``state_dict()`` (a resume at the
same sizes). For ``torch_dist`` SARA's state (bases, low-rank moments, refresh counters,
fp32 masters) is saved per matrix at its TP=1 layout (``megatron_checkpoint``): Megatron's
stock mapping cannot hold it, since it requires state shaped like the parameter. Such a
checkpoint loads at another TP size and at another DP size (keep the distributed
optimizer on or off as it was saved); the rest of the chain uses Megatron's own sharded
state.

Distributed optimizer (``OptimizerConfig.use_distributed_optimizer=True``, Megatron-LM's
``--use-distributed-optimizer``): each data-parallel rank owns whole parameters, through
megatron-core's own ``LayerWiseDistributedOptimizer``. A rank keeps the fp32 masters and
the optimizer state of what it owns only, runs those matrices' refreshes and updates,
and the updated parameters are all-gathered after the step. Projected matrices are
balanced over ranks by refresh cost, the rest (embeddings, output layer, norms) by size,
and the rest keep Megatron's Adam, distributed layer-wise beside SARA. Megatron's flat
distributed optimizer cannot be used underneath: it reduce-scatters the gradient buffer, so
no rank holds a 2-D gradient. The model must therefore be wrapped with
``DistributedDataParallelConfig(use_distributed_optimizer=False)`` (gradients all-reduced);
the other wrapping is refused with a message saying so.

Refused with a clear error: fp16 (use bf16) and expert-parallel parameters under the
distributed optimizer.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from .. import versions
from ..optim import OPTIMIZERS
from ..sharding.tensor_parallel import TensorParallelLayout

MEGATRON_INCLUDE = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class MegatronLayout(TensorParallelLayout):
    """megatron-core's parameters, or the fp32 masters ``Float16OptimizerWithFloat16Params`` swaps in (same shapes,
    in order), with TP-split weights marked by Megatron (``partition_dim``) over the TP group. Under the
    distributed optimizer (``megatron_distributed``) each data-parallel rank steps the matrices it owns
    (``owned``), and all of them agree on skipping a step (``owner_group``)."""

    def __init__(self, tp_group=None):
        super().__init__(tp_group)
        self.owner_group = None  # ranks that each step a different subset of the matrices
        self.owned = None        # matrix ids this rank steps (None: all)

    def step_groups(self) -> list:
        return super().step_groups() + ([self.owner_group] if self.owner_group is not None else [])

    def owns(self, index: int) -> bool:
        return self.owned is None or index in self.owned


def _projected(name: str, param, include) -> bool:
    return (param.requires_grad and param.dim() == 2 and not getattr(param, "is_embedding_or_output_parameter", False)
            and getattr(param, "allreduce", True) and any(re.search(p, name) for p in include))


def get_sara_megatron_optimizer(config, model_chunks, *, rank: int, update_proj_gap: int = 200, scale: float = 0.25,
                                optimizer: str = "SaraAdamW", include=MEGATRON_INCLUDE, config_overrides=None,
                                use_gloo_process_groups: bool = True, **sara_options):
    from megatron.core.optimizer import get_megatron_optimizer

    versions.check("megatron-core")
    distributed = bool(getattr(config, "use_distributed_optimizer", False))
    _check_gradient_reduction(model_chunks, distributed)
    if distributed:
        # the builders below make plain (unsharded, fp32-wrapped) optimizers; the layer-wise wrapper shards them
        # and only then makes fp32 masters, for the owned parameters alone
        build_config = dataclasses.replace(config, use_distributed_optimizer=False, bf16=False)
    else:
        build_config = config
    if getattr(config, "fp16", False):
        raise ValueError("sara_ds: fp16 (OptimizerConfig.fp16=True) is not supported; use bf16")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"sara_ds: optimizer must be one of {sorted(OPTIMIZERS)}, got optimizer={optimizer!r}")
    targets, others, names = _split_parameters(model_chunks, include)
    with _frozen(others):
        groups = _megatron_param_groups(model_chunks, config, config_overrides)
    for g in groups:  # names make subspace_overlaps() readable
        g.update(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type="std",
                 param_names=[names[id(p)] for p in g["params"]])
    inner, sara = _sara_side(groups, optimizer, config, build_config, sara_options)
    with _frozen(targets):
        rest = get_megatron_optimizer(build_config, model_chunks, config_overrides=config_overrides,
                                      use_gloo_process_groups=use_gloo_process_groups)
    rest = list(getattr(rest, "chained_optimizers", [rest]))
    gated = _gated_weights(model_chunks)
    if not distributed:
        from .megatron_checkpoint import SaraCheckpoint, model_and_main_params
        from .megatron_distributed import SaraChainedOptimizer

        # torch_dist: SARA's state per matrix at its TP=1 layout, written by DP rank 0 (SARA is replicated over DP)
        sara.sara_checkpoint = SaraCheckpoint(inner, lambda: model_and_main_params(sara, inner), names, gated,
                                              owned_by_one_dp_rank=False)
        return SaraChainedOptimizer([sara] + rest)
    from .megatron_distributed import layer_wise_optimizer

    return layer_wise_optimizer(config, [sara] + rest, inner, names, gated, model_chunks)


def _split_parameters(model_chunks, include) -> tuple:
    """(the projected parameters, the rest, id -> name) of the model chunks."""
    targets, others, names = [], [], {}
    for index, chunk in enumerate(model_chunks):
        for name, p in chunk.named_parameters():
            names[id(p)] = name if len(model_chunks) == 1 else f"chunk{index}.{name}"
            if p.requires_grad:
                (targets if _projected(name, p, include) else others).append(p)
    if not targets:
        raise ValueError(f"sara_ds: no 2-D parameter matched include={list(include)}; nothing would be projected")
    return targets, others, names


def _gated_weights(model_chunks) -> set:
    """ids of the weights megatron-core checkpoints through ``apply_swiglu_sharded_factory``: ``linear_fc1`` of each
    ``MLP`` with a gated linear unit, whose TP rank i holds [gate_i; up_i] (``MLP.sharded_state_dict``'s own test)."""
    from megatron.core.transformer.mlp import MLP

    return {id(m.linear_fc1.weight) for chunk in model_chunks for m in chunk.modules()
            if isinstance(m, MLP) and m.config.gated_linear_unit}


def _megatron_param_groups(model_chunks, config, config_overrides) -> list:
    """megatron-core's param groups for the parameters that require grad, with the keys its LR scheduler reads
    (max_lr, min_lr, wd_mult, ...). megatron-core builds them in its private ``_get_param_groups`` (0.16.1 and
    0.19.2), as its own Muon builder does; no public function returns them."""
    from megatron.core.optimizer import _get_param_groups

    return _get_param_groups(model_chunks, config, config_overrides)


def _sara_side(groups, optimizer, config, build_config, sara_options) -> tuple:
    """The SARA optimizer over ``groups`` and Megatron's fp32 (or bf16-masters) wrapper around it."""
    from megatron.core import parallel_state
    from .megatron_checkpoint import SaraFloat16Optimizer, SaraFP32Optimizer

    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay,
                  layout=MegatronLayout(parallel_state.get_tensor_model_parallel_group()))
    if optimizer != "SaraAdafactor":
        kwargs.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    inner = OPTIMIZERS[optimizer](groups, **kwargs, **sara_options)

    def init_state_fn(opt, config=None):  # SARA state is created on the first step; nothing to pre-allocate
        return None

    sara = (SaraFloat16Optimizer(inner, config, None, init_state_fn) if build_config.bf16
            else SaraFP32Optimizer(inner, build_config, init_state_fn))
    sara.grad_stats_parallel_group = parallel_state.get_model_parallel_group()
    sara.tp_group = parallel_state.get_tensor_model_parallel_group()  # read by megatron-core's grad-norm code
    return inner, sara


class _frozen:
    """``requires_grad`` off for these parameters inside the block, so that a builder skips them."""

    def __init__(self, params):
        self.params = params

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _check_gradient_reduction(model_chunks, distributed: bool) -> None:
    """Every rank must find the whole, reduced gradient of each matrix it steps: all-reduced buffers, or (SARA's
    distributed optimizer on megatron-core >= 0.19) reduce-scattered ones laid out by ``shard_aligned_layout``."""
    from .megatron_distributed import shard_aligned, supports_shard_aligned_buffers

    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not ddp_config.use_distributed_optimizer:
            continue
        if not distributed:
            raise ValueError(
                "sara_ds: the model's DistributedDataParallelConfig(use_distributed_optimizer=True) reduce-scatters "
                "the gradients, but OptimizerConfig.use_distributed_optimizer=False steps every matrix on every "
                "rank, which then lacks the other ranks' part of its gradient. Set both to the same value.")
        if shard_aligned([chunk]):
            continue
        fix = ("build the DDP with full_param_layout=sara_ds.integrations.megatron_distributed.shard_aligned_layout("
               "module, ddp_config) (reduce-scattered, whole parameters per rank), or "
               if supports_shard_aligned_buffers() else "")
        raise ValueError(
            f"sara_ds: with OptimizerConfig.use_distributed_optimizer=True, {fix}wrap the model with "
            "DistributedDataParallelConfig(use_distributed_optimizer=False), got use_distributed_optimizer=True "
            "with Megatron's flat buffer layout. SARA's distributed optimizer gives each data-parallel rank whole "
            "matrices (megatron-core's LayerWiseDistributedOptimizer); a reduce-scatter into the flat buffer "
            "leaves no rank a matrix's whole gradient.")


def sara_checkpoint(chained):
    """The ``SaraCheckpoint`` of a chain built by ``get_sara_megatron_optimizer`` (``full_states()``: every
    matrix's state at its TP=1 layout)."""
    return getattr(chained, "checkpoint", None) or chained.chained_optimizers[0].sara_checkpoint


def sara_state(chained) -> torch.optim.Optimizer:
    """The SaraOptimizer inside a chained Megatron optimizer (for metrics such as subspace_overlaps())."""
    return chained.chained_optimizers[0].optimizer
