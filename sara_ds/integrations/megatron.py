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

Checkpoints: ``--ckpt-format torch`` saves each rank's ``state_dict()``. For
``torch_dist`` the SARA part's ``sharded_state_dict`` stores the low-rank state
(bases, low-rank moments, refresh counters) as one ``ShardedObject`` per
(pipeline, tensor) rank, written by data-parallel rank 0; the bf16 master weights
keep Megatron's own per-parameter sharding. Megatron's stock mapping cannot be used
because it requires optimizer state shaped like the parameter. The low-rank part
therefore resumes at the same TP and PP sizes only; a load at other sizes
fails in dist_checkpointing with "Missing key ... optimizer.sara.tp<T>_pp<P>".

Refused with a clear error: Megatron's distributed optimizer (it flattens gradients
across data-parallel ranks, so no rank holds a 2-D gradient) and fp16 (use bf16).
"""
from __future__ import annotations

import re

import torch

from ..optim import OPTIMIZERS

MEGATRON_INCLUDE = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _projected(name: str, param, include) -> bool:
    return (param.requires_grad and param.dim() == 2 and not getattr(param, "is_embedding_or_output_parameter", False)
            and getattr(param, "allreduce", True) and any(re.search(p, name) for p in include))


def get_sara_megatron_optimizer(config, model_chunks, *, rank: int, update_proj_gap: int = 200, scale: float = 0.25,
                                optimizer: str = "SaraAdamW", include=MEGATRON_INCLUDE, config_overrides=None,
                                use_gloo_process_groups: bool = True, **sara_options):
    from megatron.core import parallel_state
    from megatron.core.optimizer import ChainedOptimizer, _get_param_groups, get_megatron_optimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params

    if getattr(config, "use_distributed_optimizer", False):
        raise ValueError(
            "sara_ds: --use-distributed-optimizer (OptimizerConfig.use_distributed_optimizer=True) is not supported: "
            "it flattens gradients across data-parallel ranks, so no rank holds the 2-D gradient a subspace is "
            "computed from. Drop the flag (the low-rank state is already small)."
        )
    if getattr(config, "fp16", False):
        raise ValueError("sara_ds: fp16 (OptimizerConfig.fp16=True) is not supported; use bf16")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"sara_ds: optimizer must be one of {sorted(OPTIMIZERS)}, got optimizer={optimizer!r}")

    targets, others, names = [], [], {}
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            names[id(p)] = name
            if p.requires_grad:
                (targets if _projected(name, p, include) else others).append(p)
    if not targets:
        raise ValueError(f"sara_ds: no 2-D parameter matched include={list(include)}; nothing would be projected")

    def frozen(params):
        class _Frozen:
            def __enter__(self):
                for p in params:
                    p.requires_grad_(False)

            def __exit__(self, *exc):
                for p in params:
                    p.requires_grad_(True)
        return _Frozen()

    with frozen(others):
        groups = _get_param_groups(model_chunks, config, config_overrides)
    for g in groups:  # names make subspace_overlaps() readable
        g.update(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type="std",
                 param_names=[names[id(p)] for p in g["params"]])
    cls = OPTIMIZERS[optimizer]
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay, tp_group=parallel_state.get_tensor_model_parallel_group())
    if optimizer != "SaraAdafactor":
        kwargs.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    inner = cls(groups, **kwargs, **sara_options)

    def init_state_fn(opt, config=None):  # SARA state is created on the first step; nothing to pre-allocate
        return None

    sara = (Float16OptimizerWithFloat16Params(inner, config, None, init_state_fn) if config.bf16
            else FP32Optimizer(inner, config, init_state_fn))
    sara.grad_stats_parallel_group = parallel_state.get_model_parallel_group()
    sara.tp_group = parallel_state.get_tensor_model_parallel_group()
    _install_sharded_state_dict(sara)

    with frozen(targets):
        rest = get_megatron_optimizer(config, model_chunks, config_overrides=config_overrides,
                                      use_gloo_process_groups=use_gloo_process_groups)
    return ChainedOptimizer([sara] + list(getattr(rest, "chained_optimizers", [rest])))


SARA_CHECKPOINT_KEY = "optimizer.sara"


def _install_sharded_state_dict(wrapped) -> None:
    """torch_dist support: the low-rank state goes into per-(PP, TP)-rank ShardedObjects."""
    from itertools import chain

    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            make_sharded_optimizer_tensor)

    def low_rank_objects(inner: dict) -> dict:
        pp_size, tp_size = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        # The sizes are in the key, so a load at other sizes fails with "Missing key ... sara.tp<T>_pp<P>"
        # instead of handing one rank's bases to another rank's shard.
        key = f"{SARA_CHECKPOINT_KEY}.tp{tp_size}_pp{pp_size}"
        layout = dict(global_shape=(pp_size, tp_size),
                      global_offset=(ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                      replica_id=ps.get_data_parallel_rank(with_context_parallel=True))  # DP rank 0 writes
        return {"state": ShardedObject(f"{key}.state", inner["state"], **layout),
                "param_groups": ShardedObject(f"{key}.param_groups", inner["param_groups"], **layout)}

    def sharded_state_dict(model_sharded_state_dict, is_loading: bool = False, metadata=None, **kwargs):
        state_dict = wrapped.state_dict()
        if "fp32_from_fp16_params" not in state_dict:  # FP32Optimizer: the state dict is SaraOptimizer's
            return low_rank_objects(state_dict)
        # bf16: fp32 master weights are parameter-shaped, so Megatron's own mapping applies to them
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict,
                                                   chain.from_iterable(wrapped.float16_groups))
        state_dict["fp32_from_fp16_params"] = [
            [make_sharded_optimizer_tensor(id_map[pid], master, prefix="optimizer.state.fp32_param")
             for pid, master in zip(group["params"], masters)]
            for masters, group in zip(state_dict["fp32_from_fp16_params"], state_dict["optimizer"]["param_groups"])]
        state_dict["optimizer"] = low_rank_objects(state_dict["optimizer"])
        return state_dict

    wrapped.sharded_state_dict = sharded_state_dict


def sara_state(chained) -> torch.optim.Optimizer:
    """The SaraOptimizer inside a chained Megatron optimizer (for metrics such as subspace_overlaps())."""
    return chained.chained_optimizers[0].optimizer
