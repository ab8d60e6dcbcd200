"""PyTorch FSDP2 (``fully_shard``): the layout of a model whose parameters are ``Shard(0)`` DTensors.

FSDP2 splits every parameter by rows over its data-parallel mesh (``torch.chunk``: ceil(m/N) rows per rank, the
last ranks fewer or none) and reduce-scatters each gradient into the same rows. No rank ever holds a whole
gradient. This layout steps

* an elementwise parameter (AdamW's and Adam-mini's vectors, every matrix the base steps elementwise) on the
  rows this rank holds, with its state sharded the same way;
* a whole matrix (a projected one, or one whose base's statistics span it) on one owner rank
  (``sharding.ownership``: balanced by refresh cost), which gathers the matrix's gradient and weight rows, steps
  exactly as one process would, and sends each rank its new rows in ``finish``.

Per step and whole matrix, one gather of the gradient and of the weight to the owner and one scatter back:
3·m·n·(N-1)/N elements in all, spread over the owners. State per rank: its shards' elementwise state plus its
own matrices' (about S/N plus one matrix).

An optimizer built before sharding (accelerate, the HF Trainer: their param groups get the DTensors afterwards)
adopts this layout at its first step (``Layout.adopt``). HSDP meshes (Replicate, Shard) step each replica alike on the
shard dimension (untested; their checkpoints are refused). Placements other than Shard(0) on the sharding dimension (a ``shard_placement_fn`` returning
Shard(1), FSDP x TP meshes) are refused by name.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ..layout import Layout, Slot
from ..sharding import ownership


def shard_group(param: DTensor):
    """The process group over which ``param``'s rows are split (the last mesh dim of an HSDP mesh)."""
    mesh, placements = param.device_mesh, param.placements
    dims = [d for d, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if len(dims) != 1 or placements[dims[0]] != Shard(0):
        raise ValueError(
            f"sara_ds: a parameter of shape {tuple(param.shape)} is placed {tuple(placements)} on mesh "
            f"{tuple(mesh.mesh_dim_names or range(mesh.ndim))}; the FSDP2 layout steps fully_shard's Shard(0) "
            "(with Replicate() for HSDP) only. Leave shard_placement_fn unset, and build 2-D FSDP x TP meshes "
            "without sara_ds until they are supported.")
    return mesh.get_group(mesh_dim=dims[0])


def row_counts(rows: int, world: int) -> list[int]:
    """Rows each rank holds under torch.chunk's split (FSDP2's): ceil(rows/world) each, the last ones fewer or none."""
    counts = [len(c) for c in torch.arange(rows).chunk(world)]
    return counts + [0] * (world - len(counts))


class FSDP2Layout(Layout):
    def __init__(self):
        super().__init__()
        self.owner: dict = {}          # matrix id -> rank in its shard group that steps it whole
        self.group = None              # the shard group (one for every parameter of the model)
        self._returns: list = []       # (param, full weight or None, owner) to send back in finish()
        self._live: dict = {}          # matrix id -> the DTensor parameter the engine hands over now
        self._sent = {"fsdp_gather": 0, "fsdp_scatter": 0}

    def _setup(self, group) -> None:
        self.group = group
        world = dist.get_world_size(group)
        items = [ownership.Item(m.param.numel(), tuple(m.shape), m.whole) for m in self.matrices]
        for m, rank in zip(self.matrices, ownership.owners(items, world)):
            self.owner[m.index] = rank

    def slots(self, group: dict, members: list) -> list:
        params = group["params"]
        for p in params:
            if isinstance(p, DTensor):
                rows = shard_group(p)
                if self.group is None:
                    self._setup(rows)
                elif rows is not self.group:
                    raise ValueError("sara_ds: the model's parameters are sharded over different meshes; the FSDP2 "
                                     "layout needs one fully_shard mesh for the whole model")
        indices = [self._index_of.get(id(p), m) for p, m in zip(params, members)]  # DTensors swapped in: in order
        out = []
        for p, i in zip(params, indices):
            matrix = self.matrices[i]
            if not isinstance(p, DTensor):  # a parameter fully_shard left alone
                out.append(Slot(i, p.grad, p, context=self.context(i, group)))
                continue
            self._live[i] = p
            if p.grad is None:
                continue
            elif not matrix.whole:
                out.append(Slot(i, p.grad.to_local(), p.to_local(), fragment=True))
            else:
                owner = self.owner[i]
                grad, weight = self._gather(p.grad.to_local(), p, owner), self._gather(p.to_local(), p, owner)
                self._returns.append((p, weight, owner))
                if weight is not None:
                    out.append(Slot(i, grad, weight, context=self.context(i, group)))
        return out

    def _gather(self, local: Tensor, param: DTensor, owner: int):
        """The whole tensor on its owner (None elsewhere), from each rank's rows."""
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        counts = row_counts(param.shape[0], world)
        padded = local.new_zeros((max(counts), *param.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world)] if me == owner else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, owner), group=self.group)
        if me != owner:
            self._sent["fsdp_gather"] += padded.numel() * padded.element_size()
            return None
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    def finish(self) -> None:
        """Each rank's new rows of the matrices stepped whole, from their owners."""
        world, me = (dist.get_world_size(self.group), dist.get_rank(self.group)) if self._returns else (1, 0)
        for param, weight, owner in self._returns:
            counts = row_counts(param.shape[0], world)
            local = param.to_local()
            mine = local.new_empty((max(counts), *param.shape[1:]))
            parts = None
            if me == owner:
                parts = list(torch.cat([weight, weight.new_zeros((max(counts) * world - weight.shape[0],
                                                                   *weight.shape[1:]))]).chunk(world))
                self._sent["fsdp_scatter"] += sum(t.numel() * t.element_size() for r, t in enumerate(parts) if r != me)
            dist.scatter(mine, parts, src=dist.get_global_rank(self.group, owner), group=self.group)
            local.copy_(mine[:local.shape[0]])
        self._returns = []

    # -- checkpoints through torch.distributed.checkpoint: every tensor a DTensor, so that DCP reshards it and no
    # rank's copy of a per-rank value is dropped as a duplicate
    def export_state(self, states: dict) -> dict:
        """Elementwise state as DTensors sharded like its parameter; a whole matrix's state, which only its owner
        holds, as DTensors sent row-wise from the owner to every rank (collective: every rank calls it)."""
        if self.group is None:
            return states
        mesh = next(iter(self._live.values())).device_mesh
        if mesh.ndim != 1:
            raise ValueError(f"sara_ds: the optimizer state of a model sharded over the {mesh.ndim}-D mesh "
                             f"{tuple(mesh.mesh_dim_names or range(mesh.ndim))} (HSDP) cannot be saved yet: "
                             "sara_ds's FSDP2 checkpoints support 1-D fully_shard meshes")
        out = {}
        for i, st in states.items():
            if not self.matrices[i].whole:
                p = self._live[i]
                out[i] = {k: DTensor.from_local(v, mesh, p.placements, shape=p.shape, stride=p.stride())
                          if isinstance(v, torch.Tensor) and v.shape == p.to_local().shape and v.dim() else v
                          for k, v in st.items()}
        mine = {i: {k: ("tensor", tuple(v.shape), str(v.dtype).removeprefix("torch.")) if isinstance(v, torch.Tensor)
                    else ("value", v) for k, v in st.items()} for i, st in states.items() if self.matrices[i].whole}
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, mine, group=self.group)
        me = dist.get_rank(self.group)
        for owner, held in enumerate(everyone):
            for i in sorted(held):
                out[i] = {}
                for k, spec in sorted(held[i].items()):
                    if spec[0] == "value":
                        out[i][k] = spec[1]
                        continue
                    shape, dtype = spec[1], getattr(torch, spec[2])
                    t = states[i][k] if me == owner else torch.empty(shape, dtype=dtype, device=mesh.device_type)
                    rows = [Shard(0)] if len(shape) and shape[0] else [Replicate()]
                    out[i][k] = distribute_tensor(t, mesh, rows, src_data_rank=owner)
        return out

    def import_state(self, states: dict, param_groups: list, members: list) -> dict:
        """``export_state``'s form (resharded to this world size) back to this rank's: elementwise state as its
        rows, a whole matrix's state on its owner only (collective: every rank calls it with the same keys)."""
        if not any(isinstance(v, DTensor) for st in states.values() for v in st.values()):
            return {i: st for i, st in states.items() if self.owns(i) is not False}
        if self.group is None:
            shards = [p for g in param_groups for p in g["params"] if isinstance(p, DTensor)]
            self._setup(shard_group(shards[0]))
        me, out = dist.get_rank(self.group), {}
        for i in sorted(states):
            st = states[i]
            if not self.matrices[i].whole:
                out[i] = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in st.items()}
                continue
            whole = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sorted(st.items())}
            if self.owner[i] == me:
                out[i] = whole
        return out

    def owns(self, index: int):
        return True if not self.matrices[index].whole else (
            None if self.group is None else self.owner[index] == dist.get_rank(self.group))

    def step_groups(self) -> list:
        return [] if self.group is None else [self.group]

    def reset(self) -> None:
        self._returns = []

    def bytes_sent(self) -> dict:
        return dict(self._sent)
