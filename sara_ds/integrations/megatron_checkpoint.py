"""torch_dist checkpoints of SARA's state under megatron-core, independent of the TP and DP sizes.

Each projected matrix's state is one ``ShardedObject`` keyed by the parameter's name,
held as it would be at TP=1:

* the basis (and OSD's basis moments, its anchor) is the same on every TP rank: it is
  computed from the whole matrix, whichever side is split, so it is stored once;
* every tensor in ``SPLIT_STATE`` runs along the columns of R = B^T A. Where those are the
  matrix's TP-split axis (its basis on the whole axis) they are gathered over the TP group at
  save and cut again at load; where the basis is on the split axis every TP rank holds all of
  R's columns, and they are stored once;
* the fp32 master (bf16 models) is gathered along the parameter's own split axis.

Megatron's gated fc1 keeps [gate_i; up_i] on TP rank i, while TP=1 holds
[gate; up]; both cuts follow that layout. Which weights are gated is megatron-core's own
test (``MLP.sharded_state_dict`` applies ``apply_swiglu_sharded_factory`` to them); its
factory itself builds ``ShardedTensor`` pieces of a parameter-shaped tensor, while SARA's
state is stored whole per matrix, so the gate/up cut is made here. Only one rank writes each object (TP rank 0
of a DP rank that holds the matrix), and any rank that holds the matrix at load, at
any TP or DP size, reads it. The hyperparameters of SARA's param groups are one more
object, written once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

from ..sharding.tensor_parallel import SPLIT_STATE, split_axis_of_marked

SARA_KEY = "optimizer.sara"


def _tp():
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _gather(t: torch.Tensor, dim: int, gated: bool) -> torch.Tensor:
    size, _ = _tp()
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    if gated:  # each shard is [gate_i; up_i]: TP=1 is [gate; up]
        halves = [p.chunk(2, dim=dim) for p in parts]
        parts = [h[0] for h in halves] + [h[1] for h in halves]
    return torch.cat(parts, dim=dim)


def _cut(t: torch.Tensor, dim: int, gated: bool) -> torch.Tensor:
    size, rank = _tp()
    if not gated:
        return t.chunk(size, dim=dim)[rank].clone()
    gate, up = t.chunk(2, dim=dim)
    return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim).clone()


def model_and_main_params(wrapped, inner) -> list:
    """(model parameters, the tensors SARA steps for them: the same ones, or fp32 masters) per SARA param group
    of ``wrapped``, Megatron's FP32Optimizer or Float16OptimizerWithFloat16Params around ``inner``."""
    if isinstance(wrapped, Float16OptimizerWithFloat16Params):
        return list(zip(wrapped.float16_groups, wrapped.fp32_from_float16_groups))
    return [(g["params"], g["params"]) for g in inner.param_groups]


class SaraCheckpoint:
    """Saves and loads the SARA part of a Megatron optimizer chain. ``pairs()`` gives, per SARA param group,
    (model parameters, the tensors SARA steps for them: the same ones, or fp32 masters). ``gated``: the ids
    of the gated fc1 weights."""

    def __init__(self, inner, pairs, names: dict, gated: set, owned_by_one_dp_rank: bool):
        self.inner, self.pairs, self.names, self.gated = inner, pairs, names, gated
        self.owned_by_one_dp_rank = owned_by_one_dp_rank

    @staticmethod
    def _split(param) -> bool:
        return split_axis_of_marked(param) is not None and ps.get_tensor_model_parallel_world_size() > 1

    @classmethod
    def _columns_split(cls, param, state: dict) -> bool:
        """R's columns are split over TP (the basis on the whole axis): row-parallel with a left basis, column-parallel
        with a right one. A full-rank state has no basis and runs along the weight's own layout."""
        return cls._split(param) and state.get("left", True) == (split_axis_of_marked(param) == 1)

    def _object(self, suffix: str, obj, replica_id) -> ShardedObject:
        pp = ps.get_pipeline_model_parallel_world_size()
        return ShardedObject(f"{SARA_KEY}.{suffix}", obj, global_shape=(pp,),
                             global_offset=(ps.get_pipeline_model_parallel_rank(),), replica_id=replica_id)

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        _, tp_rank = _tp()
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        owner_replica = (tp_rank, 0 if self.owned_by_one_dp_rank else dp_rank)  # one copy of each is main
        full = {} if is_loading else self.full_states()
        matrices = {name: self._object(name, full.get(name), owner_replica)
                    for model_params, _ in self.pairs() for name in (self.names[id(p)] for p in model_params)}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.inner.state_dict()["param_groups"]]
        return {"matrices": matrices, "param_groups": self._object("param_groups", groups, (tp_rank, dp_rank))}

    def full_states(self) -> dict:
        """name -> the state of every matrix held here, at its TP=1 layout (a collective over the TP group)."""
        return {self.names[id(p)]: self._full_state(p, main, self.names[id(p)])
                for model_params, mains in self.pairs() for p, main in zip(model_params, mains)}

    def _full_state(self, p, main, name) -> dict:
        gated = id(p) in self.gated
        own = self.inner.state.get(self.inner.layout.index_of(p), {})
        split = self._columns_split(p, own)
        state = {}
        for key, value in own.items():
            if isinstance(value, torch.Tensor):
                # clone: a bank's views would otherwise save the whole bank
                value = _gather(value, -1, gated) if split and key in SPLIT_STATE else value.detach().clone()
            state[key] = value
        master = None
        if main is not p:
            master = _gather(main.detach(), split_axis_of_marked(p), gated) if self._split(p) else main.detach().clone()
        return {"state": state, "master": master, "shape": tuple(p.shape), "tp": _tp()[0]}

    def load_state_dict(self, loaded: dict) -> None:
        saved_groups = loaded["param_groups"]
        if len(saved_groups) != len(self.inner.param_groups):
            raise ValueError(f"sara_ds: the checkpoint has {len(saved_groups)} SARA param groups, this optimizer "
                             f"{len(self.inner.param_groups)}")
        state, groups = {}, []
        for (model_params, mains), saved in zip(self.pairs(), saved_groups):
            ids = []
            for p, main in zip(model_params, mains):
                name = self.names[id(p)]
                if name not in loaded["matrices"]:
                    raise KeyError(f"sara_ds: the checkpoint holds no SARA state for {name}")
                obj = loaded["matrices"][name]
                gated = id(p) in self.gated
                if obj["master"] is not None and main is not p:
                    main.detach().copy_(_cut(obj["master"], split_axis_of_marked(p), gated) if self._split(p)
                                        else obj["master"])
                split = self._columns_split(p, obj["state"])
                st = {k: (_cut(v, -1, gated) if split and k in SPLIT_STATE else v) if isinstance(v, torch.Tensor)
                      else v for k, v in obj["state"].items()}
                ids.append(self.inner.layout.index_of(p))
                if st:
                    state[ids[-1]] = st
            groups.append(dict(saved, params=ids))
        self.inner.load_state_dict({"state": state, "param_groups": groups})


class SaraTorchDist:
    """SARA's place in a replicated chain (no distributed optimizer): its torch_dist state is the
    ``SaraCheckpoint`` objects; a per-rank ``state_dict()`` (``--ckpt-format torch``) is megatron-core's."""

    sara_checkpoint: SaraCheckpoint

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None, **kwargs):
        return {"sara": self.sara_checkpoint.sharded_state_dict(is_loading)}

    def load_state_dict(self, state_dict):
        if isinstance(state_dict, dict) and "sara" in state_dict:
            return self.sara_checkpoint.load_state_dict(state_dict["sara"])
        return super().load_state_dict(state_dict)


class SaraFP32Optimizer(SaraTorchDist, FP32Optimizer):
    """megatron-core's FP32Optimizer around a SARA optimizer."""


class SaraFloat16Optimizer(SaraTorchDist, Float16OptimizerWithFloat16Params):
    """megatron-core's bf16 wrapper (fp32 masters) around a SARA optimizer."""
