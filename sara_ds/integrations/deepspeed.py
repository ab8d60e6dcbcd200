"""DeepSpeed: ``"optimizer": {"type": "SaraAdamW", "params": {...}}`` in the config JSON.

DeepSpeed has no optimizer registry: an unknown ``type`` is resolved with
``getattr(torch.optim, type)(model_parameters, **params)``. ``register()`` (run by
``import sara_ds``) therefore puts one validating factory per optimizer on
``torch.optim``. The factory

  * checks every key under ``params`` and names any it does not know;
  * builds the projected / regular groups by the papers' rule (attn/mlp linears),
    or ``include`` / ``exclude`` regexes from the config, using the parameter names
    of the engine that is calling it;
  * refuses engine settings that would corrupt low-rank state
    (``zero_optimization.elastic_checkpoint``; tensor parallelism at ZeRO-3);
  * with ``checkpoint.load_universal``, has the optimizer refuse to step until ``load_checkpoint`` (below) has
    restored sara_ds's state from a universal checkpoint written by ``python -m sara_ds.ds_to_universal``;
  * adds the class to DeepSpeed's ZeRO allow-list, so no
    ``zero_allow_untested_optimizer`` is needed.

Under ZeRO-1/2/3 the factory hands the optimizer a ``DeepSpeedLayout``, which maps
DeepSpeed's flat partitions back to matrices (``sara_ds.sharding.zero``) through
DeepSpeed's own links; nothing in DeepSpeed is patched for that.

DeepSpeed offers no public way to what sara_ds needs here, so this module reads these of
its names (checked with DeepSpeed 0.19.8; ``tests/test_deepspeed*.py`` run each):

  * the calling ``DeepSpeedEngine`` on the call stack (``_calling_engine``): the config route
    builds the optimizer inside ``deepspeed.initialize`` with no reference to the engine;
  * ``engine._config.bfloat16_config.check_grad_overflow``;
  * a ZeRO-1/2 parameter's ``_hp_mapping`` (``lp_fragment_address``, ``hp_fragment_address``,
    ``hp_fragment``) and ``_dp_group``: where its piece of this rank's flat partition lies;
  * a ZeRO-3 parameter's ``ds_shape``, ``ds_id``, ``ds_tensor``, ``ds_process_group`` and
    ``partition_numel()``, and the sub-group partition's ``ds_id`` ("<first>_<last>");
  * ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`` (the ZeRO allow-list).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import time

import torch

import torch.distributed as dist

from .. import groups, versions
from ..config import SUBSPACE_OPTIONS
from ..optim import OPTIMIZERS
from ..sharding import zero
from ..sharding.tensor_parallel import TensorParallelContext, TensorParallelLayout, split_axis_of_marked
from . import deepspeed_universal

SELECTION_KEYS = {"rank", "update_proj_gap", "scale", "proj_type", "include", "exclude"}
# where ZeRO-3 steps a projected matrix (``sharding.zero``): not optimizer hyperparameters, but the layout's
ZERO3_KEYS = {"zero3_ownership": ("auto", "rows", "whole"), "zero3_spectrum": ("gather", "tsqr", "gram", "sketch")}


def _constructor_keys(cls) -> set:
    """The base's own arguments and the subspace options (``SubspaceOptions``)."""
    return {name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "params", "tp_group", "layout") and p.kind is not p.VAR_KEYWORD} | set(SUBSPACE_OPTIONS)


def _calling_engine():
    """The DeepSpeedEngine that is configuring its optimizer, found on the call stack (or None): DeepSpeed builds a
    config-named optimizer in ``DeepSpeedEngine._configure_basic_optimizer`` with the parameters alone."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and type(owner).__name__ in ("DeepSpeedEngine", "PipelineEngine") and hasattr(owner, "module"):
            return owner
        frame = frame.f_back
    return None


def _refuse_unsupported(engine) -> None:
    if engine.zero_optimization_stage() not in (0, 1, 2, 3):
        raise ValueError(f"sara_ds: zero_optimization.stage={engine.zero_optimization_stage()} is not supported; "
                         "use stage 0, 1, 2 or 3")
    offload = engine.zero_offload_optimizer() if engine.zero_optimization() else None
    if offload is not None and getattr(offload.device, "value", offload.device) == "nvme":
        raise ValueError(
            "sara_ds: zero_optimization.offload_optimizer.device='nvme' is not supported: DeepSpeed swaps each "
            "partition's flat optimizer-state tensors to NVMe, and sara_ds's per-matrix state (bases, low-rank "
            "moments) is not such a tensor, so it would never be swapped. Use \"device\": \"cpu\" (supported at "
            "stages 1-3), or none.")
    if engine.zero_optimization() and engine.zero_elastic_checkpoint():
        raise ValueError(
            "sara_ds: zero_optimization.elastic_checkpoint=true is not supported: DeepSpeed truncates every "
            "optimizer-state tensor to the flat partition size when saving elastically, which would corrupt the "
            "low-rank moments and bases. Set it to false (the default)."
        )
    if engine.zero_optimization_stage() in (1, 2):
        # ZeRO-1/2 hands the optimizer one param group at a time, so no optimizer can see a NaN in another
        # group: the whole-step skip has to be the engine's own overflow check. Keep it on.
        why = ("DeepSpeed's ZeRO-1/2 steps each param group separately, so a non-finite gradient in one group "
               "would still move the others (half a step); the engine's own check must skip the whole step")
        # both switches came with DeepSpeed 0.19; before it the check always runs
        bf16_config = getattr(engine._config, "bfloat16_config", None)
        if engine.bfloat16_enabled() and not getattr(bf16_config, "check_grad_overflow", True):
            raise ValueError(f"sara_ds: bf16.check_grad_overflow=false is not supported: {why}. "
                             "Remove the key (its default is true).")
        computes_norm = getattr(engine, "zero_compute_grad_norm", lambda: True)()
        if not (engine.bfloat16_enabled() or engine.fp16_enabled()) and not computes_norm:
            raise ValueError(f"sara_ds: zero_optimization.compute_grad_norm=false is not supported: {why} "
                             "(in fp32 that check is the invalid-norm test). Remove the key (its default is true).")
    if engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 0:
        raise ValueError(
            "sara_ds: checkpoint.load_universal=true is supported at zero_optimization.stage 1, 2 and 3. At stage 0 "
            "every rank holds the whole optimizer state and the regular checkpoint (mp_rank_00_model_states.pt) "
            "loads at any data-parallel size: remove checkpoint.load_universal."
        )


def tensor_parallel_group(engine):
    """The engine's tensor-parallel group, or None where it has none (or one of size 1).

    Both ways DeepSpeed does TP leave it on ``engine.mpu``: Megatron-DeepSpeed passes its
    ``mpu`` to ``deepspeed.initialize`` (``get_tensor_model_parallel_group``, or the classic
    ``get_model_parallel_group``), and AutoTP (``"tensor_parallel": {"autotp_size": N}``)
    installs ``deepspeed.utils.groups`` there before the optimizer is built.
    """
    mpu = getattr(engine, "mpu", None)
    for name in ("get_tensor_model_parallel_group", "get_model_parallel_group"):
        get = getattr(mpu, name, None)
        if get is None:
            continue
        try:
            group = get()
        except AssertionError:  # deepspeed.utils.groups before any TP was set up
            return None
        return group if group is not None and torch.distributed.get_world_size(group) > 1 else None
    return None


def _refuse_tp_weights_without_group(param_groups, tp_group, engine) -> None:
    """A TP-split weight without a TP group would get a per-shard subspace: another algorithm, silently."""
    if tp_group is not None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    names = {id(p): n for n, p in engine.module.named_parameters()} if engine is not None else {}
    for group in param_groups:
        if "rank" not in group:
            continue
        for i, p in enumerate(group["params"]):
            if split_axis_of_marked(p) is not None:
                name = names.get(id(p), f"parameter {i} of the projected group")
                raise ValueError(
                    f"sara_ds: {name} is a tensor-parallel shard (tensor_model_parallel=True, split on dim "
                    f"{split_axis_of_marked(p)}), but the DeepSpeed engine has no tensor-parallel group, so "
                    "its subspace would be computed from this shard alone. Pass the group: "
                    "deepspeed.initialize(..., mpu=sara_ds.integrations.deepspeed.MegatronCoreMPU()) for megatron-core "
                    "layers (or your Megatron-DeepSpeed mpu), or \"tensor_parallel\": {\"autotp_size\": N} in the "
                    "config for DeepSpeed's AutoTP."
                )


class MegatronCoreMPU:
    """megatron-core's ``parallel_state`` under the names DeepSpeed calls on an ``mpu``.

    Megatron-DeepSpeed hands ``deepspeed.initialize(mpu=...)`` its own ``mpu`` with the classic
    ``get_model_parallel_*`` / ``get_data_parallel_*`` names, which megatron-core's
    ``parallel_state`` no longer has. Initialise ``parallel_state.initialize_model_parallel`` first.
    "Model parallel" is tensor x pipeline, as in Megatron.
    """

    def __init__(self):
        from megatron.core import parallel_state

        versions.check("megatron-core")
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("sara_ds: MegatronCoreMPU needs megatron.core.parallel_state.initialize_model_parallel() "
                               "to have run first")
        self._ps = parallel_state

    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return torch.distributed.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self):
        return torch.distributed.get_rank(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self):
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self._ps.get_pipeline_model_parallel_rank()


def deepspeed_shape(param) -> torch.Size:
    """A parameter's own shape; under ZeRO-3 (``deepspeed.zero.Init``, or once an engine has partitioned it) the
    tensor is an empty 1-D stub and the real shape is ``ds_shape``."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


class DeepSpeedLayout(TensorParallelLayout):
    """Where a DeepSpeed engine puts the optimizer's matrices: the parameters or their fp32 masters (ZeRO-0), a flat
    fp32 partition per param group (ZeRO-1/2), or one per sub-group (ZeRO-3), each rank's piece of the group's
    flattened parameters; TP-split weights over the engine's TP group (``mpu`` or AutoTP)."""

    def __init__(self, tp_group=None, zero_stage: int | None = None, universal_pending: bool = False,
                 zero3_ownership: str = "auto", zero3_spectrum: str = "gather"):
        super().__init__(tp_group)
        for key, value in (("zero3_ownership", zero3_ownership), ("zero3_spectrum", zero3_spectrum)):
            if value not in ZERO3_KEYS[key]:
                raise ValueError(f"sara_ds: {key} must be one of {list(ZERO3_KEYS[key])}, got {key}={value!r}")
        self.zero_stage = zero_stage
        # checkpoint.load_universal: no step before ``load_checkpoint`` has restored sara_ds's state (it would start
        # every matrix's moments and basis afresh)
        self.universal_pending = universal_pending
        # ZeRO-3: 'rows' steps each projected matrix with a right basis in row blocks (``sharding.zero``), its
        # spectrum formed by ``zero3_spectrum``; 'whole' steps every matrix on one rank; 'auto' takes row blocks
        # while the optimizer state stays within stock AdamW's (``zero.affordable_row_blocks``)
        self.zero3_ownership, self.zero3_spectrum = zero3_ownership, zero3_spectrum
        self._row_allowed = None
        self.partitions: dict = {}  # id(flat partition) -> zero.Partition
        self.loads = None           # ZeRO-3: optimizer state each DP rank steps so far, across sub-groups
        self.refresh_loads = None   # ZeRO-3: refresh cost of the row-block spectra each DP rank forms so far
        self._row_contexts: dict = {}
        self._stepping: list = []   # (partition, its param group) stepped since the last ``finish``

    def shape_of(self, param) -> torch.Size:
        return deepspeed_shape(param)

    def slots(self, group: dict, members: list) -> list:
        if self.universal_pending:
            raise RuntimeError(deepspeed_universal.NOT_LOADED)
        params = group["params"]
        if not self._flat(params):
            return super().slots(group, members)
        out = []
        for flat in params:
            partition = self.partition(flat, members, group)
            if flat.grad is not None:
                out += zero.partition_slots(flat, partition, self.matrices, lambda i: self.context(i, group))
                self._stepping.append((partition, group))
        return out

    def partition(self, flat, members: list, group: dict) -> zero.Partition:
        """This rank's piece of a flat partition of param group ``group``, with its straddlers' steppers and its
        row blocks (built once per partition)."""
        partition = self.partitions.get(id(flat))
        if partition is None:
            if isinstance(getattr(flat, "ds_id", None), str):
                partition = self._zero3_partition(flat, members)
                world = dist.get_world_size(partition.group)
                self.loads = self.loads or [0] * world
                self.refresh_loads = self.refresh_loads or [0] * world
                if self._row_allowed is None:
                    self._row_allowed = ({m.index for m in self.matrices} if self.zero3_ownership == "rows" else
                                         zero.affordable_row_blocks(self.matrices, world)
                                         if self.zero3_ownership == "auto" else set())
                zero.choose_row_blocks(partition, self.matrices, self._row_allowed, self.loads, self.refresh_loads)
                partition.steppers = zero.choose_zero3_steppers(partition, self.matrices, self.loads)
            else:
                partition = self._zero12_partition(flat, members)
                partition.steppers = zero.choose_steppers(partition, self.matrices)
            self.partitions[id(flat)] = partition
        return partition

    def _flat(self, params) -> bool:
        return all(p.dim() == 1 for p in params) and any(id(p) not in self._index_of for p in params) and (
            any(isinstance(getattr(p, "ds_id", None), str) for p in params)
            or any(hasattr(m.param, "_hp_mapping") for m in self.matrices))

    def _zero12_partition(self, flat, members: list) -> zero.Partition:
        """Each parameter's piece of this rank's flat partition, from the ``_hp_mapping`` DeepSpeed links it with
        (the links behind ``deepspeed.utils.safe_get_full_grad``)."""
        storage = flat.untyped_storage().data_ptr()
        mine, group = [], None
        for i in members:
            q = self.matrices[i].param
            group = getattr(q, "_dp_group", group)
            hp = getattr(q, "_hp_mapping", None)
            if hp is None or hp.hp_fragment.untyped_storage().data_ptr() != storage:
                continue
            mine.append(zero.Fragment(i, hp.lp_fragment_address.start, hp.lp_fragment_address.numel,
                                      hp.hp_fragment_address.start))
        mine.sort(key=lambda f: f.hp_start)
        split = {i for i in members if self.split_axis_of(self.matrices[i].param) is not None}
        zero.check_same_ownership_across_tp(mine, split, self.tp_group)
        return zero.Partition(mine, zero.exchange_owners(mine, group), group, dist.get_rank(group))

    def _zero3_partition(self, flat, members: list) -> zero.Partition:
        """A ZeRO-3 sub-group's parameters are a run of the group's trainable ones, from the ``ds_id`` its fp32
        partition names first to the one it names last; each holds ``partition_numel()`` elements of it, padding
        included."""
        first, last = (int(x) for x in flat.ds_id.split("_"))
        trainable = [i for i in members if self.matrices[i].param.requires_grad and self.matrices[i].shape.numel()]
        ids = [self.matrices[i].param.ds_id for i in trainable]
        if first not in ids or last not in ids:
            raise RuntimeError(f"sara_ds: ZeRO-3 sub-group {flat.ds_id!r} names parameters (ds_id {first} to {last}) "
                               "that are not in the param group this optimizer was built with")
        run = trainable[ids.index(first):ids.index(last) + 1]
        group = self.matrices[run[0]].param.ds_process_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        mine, owners, offset = [], {}, 0
        for i in run:
            piece, numel = self.matrices[i].param.partition_numel(), self.matrices[i].shape.numel()
            owners[i] = [(r, r * piece, zero.zero3_piece(numel, world, r)) for r in range(world)
                         if zero.zero3_piece(numel, world, r)]
            if zero.zero3_piece(numel, world, rank):
                mine.append(zero.Fragment(i, rank * piece, zero.zero3_piece(numel, world, rank), offset))
            offset += piece
        if offset != flat.numel():
            raise RuntimeError(f"sara_ds: ZeRO-3 sub-group {flat.ds_id!r} holds {flat.numel()} elements on this rank, "
                               f"but its parameters' pieces add up to {offset}: DeepSpeed's stage-3 layout is not the "
                               "one sara_ds knows (deepspeed/runtime/zero/stage3.py)")
        return zero.Partition(mine, owners, group, rank, zero3=True)

    def context(self, index: int, group: dict):
        """A row block's: R's columns split over the DP group, unevenly (``sharding.zero``); else the matrix's."""
        whole = super().context(index, group)
        partition = next((p for p in self.partitions.values() if index in p.rows), None)
        if partition is None:
            return whole
        key = (index, self.zero3_spectrum, group["sketch_oversample"], group["sketch_power_iters"], whole)
        if key not in self._row_contexts:
            counts = [end - first for first, end in partition.rows[index]]
            self._row_contexts[key] = TensorParallelContext(partition.group, 0, *key[1:4], whole=key[4], counts=counts,
                                                            root=partition.roots[index])
        return self._row_contexts[key]

    def step_groups(self) -> list:
        groups = super().step_groups() + [p.group for p in self.partitions.values()]
        unique = {id(g): g for g in groups}  # None (the default group) is one group too
        return [g for g in unique.values() if dist.is_initialized() and dist.get_world_size(g) > 1]

    def finish(self, decay=None) -> None:
        for partition, group in self._stepping:
            partition.finish(None if decay is None else lambda pieces, group=group: decay(pieces, group))
        self._stepping = []

    def reset(self) -> None:
        self.partitions.clear()
        self._row_contexts.clear()
        self._stepping = []
        self.loads = self.refresh_loads = self._row_allowed = None

    def owns(self, index: int):
        for partition in self.partitions.values():
            if any(f.index == index for f in partition.fragments):
                return partition.steps(index)
            if index in partition.owners:
                return False
        return True if not self.partitions and self.zero_stage in (0, None) else None

    def bytes_sent(self) -> dict:
        """'exchange': straddlers' and row blocks' pieces, point to point; 'row_blocks': the row blocks' spectra,
        sums and bases over the DP group."""
        return dict(super().bytes_sent(), exchange=sum(p.bytes_sent for p in self.partitions.values()),
                    row_blocks=sum(c.bytes_sent for c in self._row_contexts.values()))


def _build_groups(model_parameters, selection: dict, engine):
    params = list(model_parameters) if model_parameters is not None else None
    if params and isinstance(params[0], dict):
        if selection:
            raise ValueError(
                f"sara_ds: model_parameters are already param groups, so optimizer params "
                f"{sorted(selection)} would be ignored; pass either groups or those keys, not both"
            )
        return params
    if engine is None:
        raise ValueError(
            "sara_ds: cannot see the model's parameter names, so the projected layers cannot be chosen. "
            "Pass model_parameters=sara_ds.param_groups(model, rank=...) to deepspeed.initialize."
        )
    include = selection.pop("include", groups.PAPER_INCLUDE)
    exclude = selection.pop("exclude", ())
    rank = selection.pop("rank", 128)
    return groups.param_groups(engine.module, rank=rank, include=include, exclude=exclude, only=params,
                               shape_of=deepspeed_shape, **selection)


def _factory(cls):
    allowed = _constructor_keys(cls) | SELECTION_KEYS | set(ZERO3_KEYS)

    def build(model_parameters=None, **params):
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(
                f"sara_ds: unknown key(s) {unknown} under optimizer.params for type {cls.__name__}; "
                f"valid keys are {sorted(allowed)}"
            )
        versions.check("deepspeed")
        engine = _calling_engine()
        tp_group = None
        if engine is not None:
            _refuse_unsupported(engine)
            tp_group = tensor_parallel_group(engine)
            if tp_group is not None and engine.zero_optimization_stage() == 3:
                raise ValueError(
                    "sara_ds: tensor parallelism with zero_optimization.stage=3 is not supported yet: a TP-split "
                    "matrix's refresh is a collective of its TP shards' steppers, which ZeRO-3's ownership does not "
                    "line up. Use stage 1 or 2 with tensor parallelism.")
        selection = {k: params.pop(k) for k in list(params) if k in SELECTION_KEYS}
        zero3 = {k: params.pop(k) for k in list(params) if k in ZERO3_KEYS}
        param_groups = _build_groups(model_parameters, selection, engine)
        _refuse_tp_weights_without_group(param_groups, tp_group, engine)
        stage = engine.zero_optimization_stage() if engine is not None else None
        pending = engine is not None and engine.load_universal_checkpoint()
        layout = DeepSpeedLayout(tp_group, stage, universal_pending=pending, **zero3)
        optimizer = cls(param_groups, layout=layout, **params)
        _allow_under_zero(cls)
        return optimizer

    build.__name__ = build.__qualname__ = cls.__name__
    build.__doc__ = f"DeepSpeed config factory for sara_ds.{cls.__name__}.\n\n{cls.__doc__}"
    build.optimizer_class = cls
    return build


def _allow_under_zero(cls) -> None:
    from deepspeed.runtime.zero import utils as zero_utils

    if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)


def register() -> None:
    """Make ``"type": "SaraAdamW" | "SaraAdafactor" | "SaraAdamMini"`` resolvable from a DeepSpeed config."""
    for name, cls in OPTIMIZERS.items():
        current = getattr(torch.optim, name, None)
        if getattr(current, "optimizer_class", None) is not cls:
            setattr(torch.optim, name, _factory(cls))


def prepare_cpu_launch(extensions_dir: str | None = None) -> None:
    """Avoid DeepSpeed's CPU start-up traps; call before ``deepspeed.init_distributed``.

    * ``init_distributed`` JIT-compiles the ``deepspeed_shm_comm`` op on CPU (1-2 min of g++,
      and it leaks a 66 MB /dev/shm buffer per rank that is never unlinked). Training never
      uses it (only inference all-reduce does), so it is not built.
    * JIT builds go to a private extensions directory, so other projects' half-finished
      builds cannot block this run, and ``lock`` files there older than 15 minutes (left
      by a killed build) are removed, since torch would otherwise wait on them forever.
    No-op on GPU accelerators.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    ext = extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not ext:
        ext = os.path.join(os.path.expanduser("~"), ".cache", "sara_ds", "torch_extensions")
        os.environ["TORCH_EXTENSIONS_DIR"] = ext
    if os.path.isdir(ext) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for root, _dirs, files in os.walk(ext):
            lock = os.path.join(root, "lock")
            if "lock" in files and time.time() - os.path.getmtime(lock) > 15 * 60:
                os.remove(lock)


def save_checkpoint(engine, save_dir: str, tag: str, client_state: dict | None = None) -> None:
    """``engine.save_checkpoint``, with ``latest`` moved to ``tag`` only once every rank has written its files.

    DeepSpeed's own ``save_latest`` has rank 0 write ``latest`` as soon as rank 0's files are written, before
    the barrier that waits for the other ranks. A rank that dies while writing its ZeRO shard then leaves
    ``latest`` naming a checkpoint whose shard is missing or truncated, and ``--resume`` fails on that rank.
    Here each rank writes with ``save_latest=False`` (which ends in DeepSpeed's barrier), and only then does
    rank 0 replace ``latest`` atomically, so ``latest`` always names a complete checkpoint.
    """
    import deepspeed.comm as dist

    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)
    dist.barrier()  # DeepSpeed's save ends in one, but that is its implementation, not its contract
    if dist.get_rank() == 0:
        pending = os.path.join(save_dir, ".latest.pending")
        with open(pending, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pending, os.path.join(save_dir, "latest"))
    dist.barrier()


def load_checkpoint(engine, load_dir: str, tag: str | None = None, **kwargs):
    """``engine.load_checkpoint``, after checking that every file of the checkpoint is whole, and under
    ``checkpoint.load_universal`` with sara_ds's state restored from the universal checkpoint's sidecar
    (``deepspeed_universal``): the documented way to load a checkpoint into a DeepSpeed engine with sara_ds.

    DeepSpeed reads a truncated file (a save cut short by a lost node) with an error that names no file
    (``OSError: [Errno 22] Invalid argument``). Each ``.pt`` file of the tag (``latest``, or
    ``latest_universal`` under ``checkpoint.load_universal``) is opened as the zip archive torch writes, which
    reads only its directory, and a damaged one is named before DeepSpeed reads anything."""
    import zipfile

    if tag is None:
        latest = os.path.join(load_dir, "latest_universal" if engine.load_universal_checkpoint() else "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"sara_ds: {latest} is missing: no complete checkpoint in {load_dir}")
        with open(latest) as f:
            tag = f.read().strip()
    folder = os.path.join(load_dir, tag)
    for root, _dirs, files in os.walk(folder):
        for name in sorted(f for f in files if f.endswith(".pt")):
            path = os.path.join(root, name)
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError) as exc:
                raise RuntimeError(f"sara_ds: {path} is damaged ({exc}): it was cut short while being written, or "
                                   "overwritten; resume from another checkpoint") from exc
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # under ZeRO, the optimizer it wraps
    if engine.load_universal_checkpoint() and isinstance(getattr(optimizer, "layout", None), DeepSpeedLayout):
        return deepspeed_universal.load_universal(engine, optimizer, load_dir, tag, **kwargs)
    return engine.load_checkpoint(load_dir, tag, **kwargs)
