"""PyTorch FSDP2 (``fully_shard``): the layout of a model whose parameters are row-sharded DTensors, alone, under
HSDP, or on a 2-D FSDP x TP mesh (``parallelize_module`` first, then ``fully_shard`` on the data-parallel dim).

FSDP2 splits every parameter by rows over its shard dim (``torch.chunk``: ceil(m/N) rows per rank, the last ranks
fewer or none) and reduce-scatters each gradient into the same rows. No rank ever holds a whole gradient. This
layout steps

* an elementwise parameter (under SaraAdamW: the vectors and every matrix it does not project) on the rows this
  rank holds, with its state sharded the same way;
* a whole matrix (a projected one, or one whose base's statistics span it) on one owner rank of the shard group
  (``sharding.ownership``: balanced by refresh cost), which gathers the matrix's gradient rows, steps it on its
  own weight rows and zeros elsewhere (no rule reads the weight but the decoupled decay, which is elementwise),
  and sends each rank the update of its rows in ``finish``; each rank adds it and decays its rows. Where tensor
  parallelism split the matrix (Shard(0) or Shard(1) on the TP dim), the owner gathers only its TP shard, and the
  owners of one matrix on every TP rank step it together with the TP spectra (``sharding.tensor_parallel``): only
  small factors cross TP ranks.

Per step and whole matrix, one gather of the gradient to the owner and one scatter of the update back:
2·m·n·(N-1)/N elements (m x n: the TP shard) in all, spread over the owners. State per rank: its shards'
elementwise state plus its own matrices' (about S/N plus one matrix).

An optimizer built before sharding (accelerate, the HF Trainer: their param groups get the DTensors afterwards)
adopts this layout at its first step (``Layout.adopt``). Checkpoints go through torch.distributed.checkpoint with
each whole matrix's state in one process's layout, so they reshard to any world size, TP size or mesh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from .. import checkpoints, functional
from ..layout import Layout, Slot
from ..sharding import ownership
from ..sharding.tensor_parallel import TensorParallelContext, from_one_process, to_one_process


@dataclass(frozen=True)
class Placement:
    """Where FSDP2 (and TP) put one parameter: its mesh, the mesh dim its rows are sharded on, and the TP dim and
    the axis TP split it along (None: not TP-split)."""

    mesh: object
    shard_dim: int
    tp_dim: int | None
    tp_axis: int | None

    @property
    def group(self):
        return self.mesh.get_group(mesh_dim=self.shard_dim)

    @property
    def tp_group(self):
        return None if self.tp_dim is None else self.mesh.get_group(mesh_dim=self.tp_dim)

    def tp_local_shape(self, shape) -> tuple:
        """The shape of this rank's TP shard of the whole parameter (what the owner steps)."""
        if self.tp_axis is None:
            return tuple(shape)
        size = self.mesh.size(self.tp_dim)
        return tuple(d // size if i == self.tp_axis else d for i, d in enumerate(shape))


def _is_rows(placement) -> bool:
    return isinstance(placement, Shard) and placement.dim == 0 or (
        type(placement).__name__ == "_StridedShard" and placement.dim == 0)  # FSDP's rows of a TP shard


def placement_of(param: DTensor) -> Placement:
    """FSDP2 puts its dims first: [Replicate() (HSDP)], Shard(0) (a _StridedShard(0) over TP's Shard(0)), then at
    most one TP dim placed Shard(0), Shard(1) or Replicate(). Anything else is refused by name."""
    mesh, placements = param.device_mesh, tuple(param.placements)
    names = tuple(mesh.mesh_dim_names or range(mesh.ndim))
    first = next((d for d, pl in enumerate(placements) if not isinstance(pl, Replicate)), None)
    rest = placements[first + 1:] if first is not None else ()
    tp = rest[0] if len(rest) == 1 else None
    tp_split = type(tp) is Shard and (tp.dim in (0, 1) and param.dim() == 2 or tp.dim == 0 and param.dim() == 1)
    if first is None or not _is_rows(placements[first]) or len(rest) > 1 or (
            rest and not (isinstance(tp, Replicate) or tp_split)):
        raise ValueError(
            f"sara_ds: a parameter of shape {tuple(param.shape)} is placed {placements} on mesh {names}; the FSDP2 "
            "layout steps fully_shard's Shard(0) rows (after Replicate() for HSDP), with at most one "
            "tensor-parallel dim after them placed Shard(0), Shard(1) or Replicate(). Leave shard_placement_fn "
            "unset, and parallelize_module 2-D weights (and column-parallel biases) column- or row-wise on one "
            "TP dim.")
    if not rest or isinstance(tp, Replicate) or mesh.size(first + 1) == 1:  # a TP dim of one rank splits nothing
        return Placement(mesh, first, first + 1 if rest else None, None)
    return Placement(mesh, first, first + 1, tp.dim)


def refuse_uneven_tp(param: DTensor, where: Placement) -> None:
    """A matrix stepped whole with the TP spectra needs equal TP shards (``tensor_parallel.refuse_uneven_split``)."""
    size = where.mesh.size(where.tp_dim)
    if param.shape[where.tp_axis] % size:
        names = tuple(where.mesh.mesh_dim_names or range(where.mesh.ndim))
        raise ValueError(
            f"sara_ds: a parameter of shape {tuple(param.shape)} is placed {tuple(param.placements)} on mesh {names}: "
            f"its dim {where.tp_axis} ({param.shape[where.tp_axis]}) does not divide evenly over the {size} ranks of "
            f"{names[where.tp_dim]!r}, and sara_ds's TP spectra need equal shards to step it whole. Choose a TP size "
            "that divides it, or leave it out of the projected group (exclude=[...]) under SaraAdamW.")


def _same_ranks(group, other) -> bool:
    return group is other or dist.get_process_group_ranks(group) == dist.get_process_group_ranks(other)


def row_counts(rows: int, world: int) -> list[int]:
    """Rows each rank holds under torch.chunk's split (FSDP2's): ceil(rows/world) each, the last ones fewer or none."""
    counts = [len(c) for c in torch.arange(rows).chunk(world)]
    return counts + [0] * (world - len(counts))


class FSDP2Layout(Layout):
    def __init__(self):
        super().__init__()
        self.owner: dict = {}          # matrix id -> rank in its shard group that steps it whole
        self.group = None              # the shard group (one for every parameter of the model)
        self.tp_group = None           # the TP group, on a 2-D FSDP x TP mesh
        self.placement: dict = {}      # matrix id -> Placement
        self._contexts: dict = {}      # TP contexts, one per matrix and spectrum choice
        self._live: dict = {}          # matrix id -> the DTensor parameter the engine hands over now
        self._returns: list = []       # (param, its TP shard's shape, whole weight or None, owner, group)
        self._sent = {"fsdp_gather": 0, "fsdp_scatter": 0}
        self._alone = False            # this step is DCP's template step on this rank alone: no collectives
        self.plain: set = set()        # matrix ids fully_shard left as plain tensors: every rank steps them

    def _place(self, index: int, param) -> Placement | None:
        """The placement of matrix ``index`` (None: a tensor fully_shard left alone), checked against the others."""
        if not isinstance(param, DTensor):
            self.plain.add(index)
            return None
        if index not in self.placement:
            where = placement_of(param)
            if self.group is None:
                self.group = where.group
                items = [ownership.Item(m.param.numel(), tuple(m.shape), m.whole) for m in self.matrices]
                self.owner = dict(zip((m.index for m in self.matrices),
                                      ownership.owners(items, dist.get_world_size(self.group))))
            if not _same_ranks(where.group, self.group):  # equal meshes made twice hold distinct groups
                raise ValueError(
                    f"sara_ds: the model's parameters are sharded over different meshes ({self.matrices[index].name} "
                    f"over ranks {dist.get_process_group_ranks(where.group)} of {param.device_mesh}, the first "
                    f"parameter over ranks {dist.get_process_group_ranks(self.group)}); the FSDP2 layout needs one "
                    "fully_shard mesh for the whole model")
            if where.tp_axis is not None and self.matrices[index].whole:
                if param.dim() != 2:  # the TP spectra and sums are written for matrices
                    raise ValueError(
                        f"sara_ds: the {tuple(param.shape)} parameter {self.matrices[index].name} is split by tensor "
                        f"parallelism ({tuple(param.placements)}) and this optimizer steps it whole (its statistics "
                        "span it); the FSDP2 layout steps a TP-split tensor whole only when it is 2-D. Under "
                        "SaraAdamW it is stepped elementwise; or leave it unsplit (Replicate()) on the TP dim.")
                refuse_uneven_tp(param, where)
                if self.matrices[index].left is None:  # full rank: refused here, on every rank, not by its owner
                    functional.refuse_blocks_across_shards(self.matrices[index].name, where.tp_axis,
                                                           self.matrices[index].base)
            if where.tp_axis is not None:
                if self.tp_group is not None and not _same_ranks(where.tp_group, self.tp_group):
                    raise ValueError("sara_ds: the model's parameters are split over different tensor-parallel "
                                     "groups; the FSDP2 layout needs one TP dim for the whole model")
                self.tp_group = where.tp_group
            self.placement[index] = where
        return self.placement[index]

    def split_axis_of(self, param: Tensor):
        where = self.placement.get(self._index_of.get(id(param)))
        return None if where is None else where.tp_axis

    def context(self, index: int, group: dict):
        whole = super().context(index, group)
        where = self.placement.get(index)
        if where is None or where.tp_axis is None:
            return whole
        key = (index, group["tp_spectrum"], group["sketch_oversample"], group["sketch_power_iters"], whole)
        if key not in self._contexts:
            self._contexts[key] = TensorParallelContext(where.tp_group, where.tp_axis, *key[1:4], whole=whole)
        return self._contexts[key]

    def adopt(self, param_groups: list) -> "FSDP2Layout":
        self._alone = self._lone_template_step(param_groups)
        return self

    def _lone_template_step(self, param_groups: list) -> bool:
        """DCP's get/set_state_dict make a zero-gradient step at lr 0 on each rank whose optimizer holds no state,
        and on that rank alone. Once ownership is placed, that is a rank owning no matrix (every one stepped whole
        elsewhere: Adafactor or Adam-mini with fewer parameters than ranks); its peers are not stepping, so it
        must make no collective."""
        if self.group is None or not all(m.whole for m in self.matrices):
            return False
        me = dist.get_rank(self.group)
        if any(self.owner[m.index] == me for m in self.matrices) or any(g["lr"] != 0 for g in param_groups):
            return False
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for g in param_groups for p in g["params"]
                 if p.grad is not None]  # local reads only: a DTensor's .any() would be a collective
        return checkpoints.is_template_step({}, param_groups, grads)  # this rank owns nothing: it holds no state

    def slots(self, group: dict, members: list) -> list:
        if self._alone:
            return []
        params = group["params"]
        indices = [self._index_of.get(id(p), m) for p, m in zip(params, members)]  # DTensors swapped in: in order
        out = []
        for p, i in zip(params, indices):
            where = self._place(i, p)
            if where is None:  # a parameter fully_shard left alone
                out.append(Slot(i, p.grad, p, context=self.context(i, group)))
                continue
            self._live[i] = p
            if p.grad is None:
                continue
            if not self.matrices[i].whole:
                out.append(Slot(i, p.grad.to_local(), p.to_local(), fragment=True))
            else:
                owner, shape = self.owner[i], where.tp_local_shape(p.shape)
                grad = self._gather(p.grad.to_local(), shape, owner)
                weight, own = self._own_rows(p.to_local(), shape, owner)
                self._returns.append((p, shape, weight, owner, group))
                if weight is not None:
                    out.append(Slot(i, grad, weight, context=self.context(i, group), weights=[own]))
        return out

    def _gather(self, local: Tensor, shape: tuple, owner: int):
        """The whole (TP shard of the) tensor on its owner, None elsewhere, from each rank's rows."""
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        counts = row_counts(shape[0], world)
        padded = local.new_zeros((max(counts), *shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world)] if me == owner else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, owner), group=self.group)
        if me != owner:
            self._sent["fsdp_gather"] += padded.numel() * padded.element_size()
            return None
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    def _own_rows(self, local: Tensor, shape: tuple, owner: int):
        """On the owner: a whole (TP shard of the) weight holding its own rows and zeros elsewhere, where the step
        leaves the update alone, and the view of its own rows; (None, None) elsewhere."""
        me = dist.get_rank(self.group)
        if me != owner:
            return None, None
        whole = local.new_zeros(shape)
        first = sum(row_counts(shape[0], dist.get_world_size(self.group))[:me])
        return whole, whole[first:first + local.shape[0]].copy_(local)

    def _scatter(self, whole, out: Tensor, rows: int, owner: int, counted: bool = True) -> None:
        """Each rank's rows of ``whole`` (held by ``owner``; None elsewhere) into ``out``; ``counted``: a step's
        traffic (``bytes_sent``), not a checkpoint's."""
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        counts = row_counts(rows, world)
        mine = out.new_empty((max(counts), *out.shape[1:]))
        parts = None
        if me == owner:
            pad = whole.new_zeros((max(counts) * world - rows, *whole.shape[1:]))
            parts = list(torch.cat([whole, pad]).chunk(world))
            if counted:
                self._sent["fsdp_scatter"] += sum(t.numel() * t.element_size() for r, t in enumerate(parts) if r != me)
        dist.scatter(mine, parts, src=dist.get_global_rank(self.group, owner), group=self.group)
        out.copy_(mine[:out.shape[0]])

    def finish(self, decay=None) -> None:
        """Each rank's rows of the matrices stepped whole, from their owners: on the owner its new rows, elsewhere
        their update, added, then decayed as the step decayed the weights (``decay``; None: skipped)."""
        me = dist.get_rank(self.group) if self._returns else None
        for param, shape, weight, owner, group in self._returns:
            local = param.to_local()
            if me == owner:
                self._scatter(weight, local, shape[0], owner)
                continue
            update = torch.empty_like(local)
            self._scatter(weight, update, shape[0], owner)
            local.add_(update)
            if decay is not None:
                decay([local], group)
        self._returns, self._alone = [], False

    # -- checkpoints through torch.distributed.checkpoint: every tensor a DTensor, so that DCP reshards it and no
    # rank's copy of a per-rank value is dropped as a duplicate
    def export_state(self, states: dict) -> dict:
        """Elementwise state as DTensors placed like its parameter; a whole matrix's state, which only its owner
        holds, in one process's layout (TP shards gathered), sent row-wise from the owner to every rank of the
        shard group and replicated over the other mesh dims (collective: every rank calls it)."""
        if self.group is None:
            return states
        out, mine, me = {}, {}, dist.get_rank(self.group)
        for i, st in states.items():
            if i in self.plain:  # the same on every rank (a replicating wrapper reduces its gradient)
                out[i] = st
                continue
            if self.matrices[i].whole and self.owner[i] != me:
                continue  # only the owner's state is real (another rank's entry is an empty dict a lookup made)
            if not self.matrices[i].whole:
                p = self._live[i]
                out[i] = {k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                          if isinstance(v, Tensor) and v.dim() and v.shape == p.to_local().shape else v
                          for k, v in st.items()}
                continue
            tp = self._tp_of(i)
            mine[i] = to_one_process(st, tp) if tp is not None else st
        specs = {i: {k: ("tensor", tuple(v.shape), str(v.dtype).removeprefix("torch.")) if isinstance(v, Tensor)
                     else ("value", v) for k, v in st.items()} for i, st in mine.items()}
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, specs, group=self.group)
        for owner, held in enumerate(everyone):
            for i in sorted(held):
                out[i] = {k: spec[1] if spec[0] == "value" else self._rows_from(mine.get(i, {}).get(k), spec, owner, i)
                          for k, spec in sorted(held[i].items())}
        return out

    def _rows_from(self, t, spec, owner: int, index: int) -> DTensor:
        """A DTensor of the owner's ``t``: its rows over the shard dim, replicated over the mesh's other dims."""
        where, shape, dtype = self.placement[index], spec[1], getattr(torch, spec[2])
        device = where.mesh.device_type
        placements = [Replicate()] * where.mesh.ndim
        if len(shape) and shape[0]:
            placements[where.shard_dim] = Shard(0)
            world = dist.get_world_size(self.group)
            local = torch.empty((row_counts(shape[0], world)[dist.get_rank(self.group)], *shape[1:]), dtype=dtype,
                                device=device)
            self._scatter(t, local, shape[0], owner, counted=False)
        else:
            local = t if t is not None else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(local, src=dist.get_global_rank(self.group, owner), group=self.group)
        return DTensor.from_local(local, where.mesh, placements, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())

    def import_state(self, states: dict, param_groups: list, members: list) -> dict:
        """``export_state``'s form (resharded to this mesh) back to this rank's: elementwise state as its rows, a
        whole matrix's state on its owner only, cut to its TP shard (every rank calls it with the same keys)."""
        for g, ids in zip(param_groups, members):
            for p, i in zip(g["params"], ids):
                if self._place(i, p) is not None:
                    self._live[i] = p
        if not any(isinstance(v, DTensor) for st in states.values() for v in st.values()):
            return {i: st for i, st in states.items() if self.owns(i) is not False}
        me, out = dist.get_rank(self.group), {}
        for i in sorted(states):
            st = states[i]
            if i in self.plain or not self.matrices[i].whole:
                out[i] = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in st.items()}
                continue
            whole = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sorted(st.items())}
            if self.owner[i] == me:
                tp = self._tp_of(i)
                out[i] = from_one_process(whole, tp) if tp is not None else whole
        return out

    def _tp_of(self, index: int):
        """The TP context a checkpoint converts matrix ``index``'s state with (None: not TP-split)."""
        where = self.placement.get(index)
        return None if where is None or where.tp_axis is None else TensorParallelContext(where.tp_group, where.tp_axis)

    def owns(self, index: int):
        return True if not self.matrices[index].whole or index in self.plain else (
            None if self.group is None else self.owner[index] == dist.get_rank(self.group))

    def step_groups(self) -> list:
        return [] if self._alone else [g for g in (self.group, self.tp_group) if g is not None]

    def owners_step(self):
        return type(self).__name__ if any(m.whole for m in self.matrices) else None

    def reset(self) -> None:
        self._returns = []

    def bytes_sent(self) -> dict:
        return dict(self._sent, tensor_parallel=sum(c.bytes_sent for c in self._contexts.values()))
