"""Resuming a DeepSpeed ZeRO-1/2/3 run at another data-parallel size: DeepSpeed's universal checkpoint, with
sara_ds's state carried beside it.

DeepSpeed's flow for Adam is::

    python -m deepspeed.checkpoint.ds_to_universal --input_folder ckpt/global_step6 --output_folder ckpt/u6
    # then "checkpoint": {"load_universal": true} in the config, and engine.load_checkpoint("ckpt", tag="u6")

Its conversion reads the literal keys ``exp_avg`` / ``exp_avg_sq`` of each flat partition's state, so it dies
on sara_ds's (``state[flat] = {matrix id: {...}}``: low-rank moments, bases, refresh counters), and its loader
only refills state shaped like the flat partition. sara_ds keeps the flow and the loading command:

* ``python -m sara_ds.ds_to_universal`` (same arguments) runs DeepSpeed's own conversion for the fp32 weights
  (``zero/<param>/fp32.pt``, TP merges included) and writes every matrix's sara_ds state once, to
  ``sara_ds/optimizer_state.pt`` beside them. A straddler's copies (one per rank that held a piece of it) must
  agree bit for bit, and every matrix the optimizer ever stepped must be there, or the conversion fails.
* ``engine.load_checkpoint`` does the rest: the optimizer factory wraps the engine's method when
  ``checkpoint.load_universal`` is on, so after DeepSpeed has put the fp32 weights into the new partitions
  each rank takes the state of the matrices it now steps (``sharding.zero``). Matrix ids and the
  refresh generator (seed, matrix id, step // gap) do not depend on the data-parallel size, so the resumed
  run draws the same subspaces.

At ZeRO-3 DeepSpeed's loader also reads ``exp_avg`` / ``exp_avg_sq`` files for every parameter, the ``step`` of
the first sub-group's state, and copies the first param group's hyperparameters into every group. The converter
writes zero-filled placeholders for the first two (sara_ds's state is in the sidecar), and the restore puts
each group's own hyperparameters back and replaces the flat Adam keys DeepSpeed filled in with sara_ds's state.

An engine built with ``load_universal`` that steps before such a load would start every moment and basis
afresh; its optimizer refuses to step until the load has run.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import inspect
import math
import os

import torch

from ..sharding.zero import zero3_piece

SIDECAR = os.path.join("sara_ds", "optimizer_state.pt")
_FORMAT = 1
_FLAT_KEYS = ("exp_avg", "exp_avg_sq")  # the flat states DeepSpeed's merge writes besides fp32


# ------------------------------------------------------------------------------------------ conversion


def _is_sara_state(group_state) -> bool:
    return isinstance(group_state, dict) and bool(group_state) and all(isinstance(k, int) for k in group_state)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # NaN overlap before a 2nd refresh
        return True
    return a == b


def _dp_rank(path: str) -> int:
    return int(os.path.basename(path).split("zero_pp_rank_")[1].split("_")[0])


def _matrices_of(model_states: dict) -> tuple[dict, dict]:
    """name -> matrix id, and matrix id -> full shape. Ids are positions in the optimizer's original parameter
    order, group by group (``SaraOptimizer``), which is the order of DeepSpeed's ``param_shapes``."""
    ids, shapes = {}, {}
    for group_shapes in model_states["param_shapes"]:
        for name, shape in group_shapes.items():
            ids[name] = len(ids)
            shapes[ids[name]] = tuple(shape)
    return ids, shapes


def _merge_copies(index: int, name: str, shape: tuple, copies: list) -> dict:
    """One matrix's state from the copies (state, piece size, DP rank) of the ranks that held a piece of it, in
    DP-rank order.

    A matrix stepped whole (held by one rank, or a straddler whose gradient is reassembled: projected
    matrices and the non-elementwise bases) has the same state on every holder. An elementwise base's
    full-rank straddler keeps per-piece state instead: 1-D tensors the size of each rank's piece, which are
    concatenated back to the parameter's shape."""
    numel = 1
    for d in shape:
        numel *= d
    states = [st for st, _, _ in copies]
    if all(_equal(states[0], other) for other in states[1:]):
        return states[0]
    merged = _join_pieces(index, name, shape, numel, copies)
    if merged is not None:
        return merged
    raise RuntimeError(
        f"sara_ds: matrix {index} ({name}) straddles ZeRO partitions and its copies on DP ranks "
        f"{[rank for _, _, rank in copies]} differ; the checkpoint is inconsistent (written by ranks at different "
        "steps?)")


def _join_pieces(index: int, name: str, shape: tuple, numel: int, copies: list) -> dict | None:
    """An elementwise base's state kept per piece (1-D, each rank's piece size), joined in DP-rank order; None if
    the copies are not such pieces."""
    states = [st for st, _, _ in copies]
    if sum(piece for _, piece, _ in copies) != numel or not all(
            isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == piece or not isinstance(v, torch.Tensor)
            for st, piece, _ in copies for v in st.values()):
        return None
    merged = {}
    for key, value in states[0].items():
        if isinstance(value, torch.Tensor):
            merged[key] = torch.cat([st[key] for st in states]).view(shape)
        elif all(st[key] == value for st in states):
            merged[key] = value
        else:
            raise RuntimeError(f"sara_ds: the pieces of {name} (matrix {index}) disagree on {key!r}: "
                               f"{[st[key] for st in states]}")
    return merged


def _merge_zero3(index: int, name: str, shape: tuple, copies: list) -> dict:
    """At ZeRO-3 a matrix stepped whole has one stepper, so one copy; an elementwise base's matrix has one piece
    per rank that holds elements of it."""
    if len(copies) == 1:
        return copies[0][0]
    numel = 1
    for d in shape:
        numel *= d
    merged = _join_pieces(index, name, shape, numel, copies)
    if merged is None:
        raise RuntimeError(f"sara_ds: matrix {index} ({name}) has state on DP ranks {[r for _, _, r in copies]} that is "
                           "neither one stepper's nor one piece per rank: the ZeRO-3 checkpoint is inconsistent")
    return merged


def _model_files(input_folder: str) -> list:
    return sorted(glob.glob(os.path.join(input_folder, "*mp_rank_*_model_states.pt")))


def collect_state(input_folder: str) -> dict | None:
    """Every matrix's sara_ds state from a ZeRO-1/2/3 checkpoint's per-rank files, once, checked.

    Returns ``{"format", "matrices": {matrix id: state}, "names": {matrix id: name}, "shapes", "dp_size",
    "zero_stage", "param_groups"}``, or None when the checkpoint holds no sara_ds state."""
    files = sorted(glob.glob(os.path.join(input_folder, "*_optim_states.pt")), key=_dp_rank)
    models = _model_files(input_folder)
    if not files or not models:
        raise FileNotFoundError(f"sara_ds: no *_optim_states.pt and *model_states.pt in {input_folder}: not "
                                "one tag of a DeepSpeed ZeRO checkpoint (pass e.g. ckpt/global_step100)")
    model_ranks = {os.path.basename(f).split("mp_rank_")[1][:2] for f in models + files}
    zero3 = any(os.path.basename(f).startswith("zero_pp_rank_") for f in models)  # stage 3 saves one per DP rank
    if model_ranks != {"00"} or (not zero3 and len(models) > 1):
        raise NotImplementedError(
            f"sara_ds: {input_folder} has several model-parallel ranks (tensor or pipeline parallel); "
            "converting sara_ds state to a universal checkpoint is supported at TP = PP = 1. Resume at the same "
            "data-parallel size from the regular checkpoint.")
    ids, shapes = _matrices_of(torch.load(models[0], map_location="cpu", weights_only=False))
    names = {i: name for name, i in ids.items()}
    copies, groups, stage = {}, None, None
    for path in files:
        sd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        stage = int(sd.get("zero_stage", 0))
        if stage == 3:
            inner = sd["optimizer_state_dict"]
            groups = inner["param_groups"]
            for group_state in inner["state"].values():
                for index, st in group_state.items() if _is_sara_state(group_state) else ():
                    piece = zero3_piece(math.prod(shapes[index]), len(files), _dp_rank(path))
                    copies.setdefault(index, []).append((st, piece, _dp_rank(path)))
            continue
        if "base_optimizer_state" not in sd:
            raise ValueError(f"sara_ds: {os.path.basename(path)} is a ZeRO stage {sd.get('zero_stage')} file; "
                             "sara_ds converts stages 1, 2 and 3")
        base_state = sd["base_optimizer_state"]
        groups = base_state["param_groups"]
        for g, mappings in enumerate(sd["param_slice_mappings"]):
            group_state = base_state["state"].get(g)
            if not _is_sara_state(group_state):
                continue
            for name, fragment in mappings.items():
                index = ids[name]
                if index in group_state:
                    copies.setdefault(index, []).append((group_state[index], fragment.numel, _dp_rank(path)))
    if not copies:
        return None
    merge = _merge_zero3 if stage == 3 else _merge_copies
    matrices = {i: merge(i, names[i], shapes[i], held) for i, held in sorted(copies.items())}
    return {"format": _FORMAT, "matrices": matrices, "names": names, "shapes": shapes, "dp_size": len(files),
            "zero_stage": stage, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups]}


_ORIGINAL = {}  # DeepSpeed's functions that _fp32_only_conversion stands in for


def _originals(d2u) -> dict:
    if not _ORIGINAL:
        _ORIGINAL.update(extract=d2u.extract_zero_shards, merge_shards=d2u._merge_zero_shards,
                         merge_tp=d2u.merge_tp_slices, extract3=d2u.extract_zero_shards_stage3,
                         merge3=d2u.merge_zero3_slices, save3=d2u._save_optimizer_state_stage3)
    return _ORIGINAL


def _extract_fp32_shards(dir, ds_checkpoint, indices_3D):
    """``extract_zero_shards`` for the fp32 weights alone (DeepSpeed's also reads ``state["exp_avg"]``)."""
    from deepspeed.checkpoint import ds_to_universal as d2u

    pp_index, tp_index, dp_index = indices_3D
    sd = ds_checkpoint.get_zero_checkpoint_state(pp_index=pp_index, tp_index=tp_index, dp_index=dp_index)
    optim_sd = sd[d2u.OPTIMIZER_STATE_DICT]
    fp32_groups = optim_sd[d2u.SINGLE_PARTITION_OF_FP32_GROUPS]
    for group_id, mappings in enumerate(optim_sd[d2u.PARAM_SLICE_MAPPINGS]):
        for name, fragment in mappings.items():
            d2u.dump_param_fragment(dir, tp_index, dp_index, "fp32", fp32_groups[group_id], name, fragment.start,
                                    fragment.numel)


def _merge_fp32_shards(param_base_path, state, tp_degree, slice_shapes=None):
    merge = _ORIGINAL["merge_shards"]
    return merge(param_base_path, "fp32" if state in _FLAT_KEYS else state, tp_degree, slice_shapes)


def _merge_fp32_tp_slices(uc_info, dir, slice_dir, tp_degree, name_and_shapes):
    """``merge_tp_slices``, whose literal loop also merges ``exp_avg`` / ``exp_avg_sq``: it is handed the fp32
    pieces for them (so its TP rules run unchanged) and their files are removed, since DeepSpeed's loader would
    put them into the flat partition's state. It installs its stand-in itself, so a worker process started
    without fork (which would not inherit the parent's replacements) merges the same way."""
    from deepspeed.checkpoint import ds_to_universal as d2u

    original = _originals(d2u)["merge_tp"]
    d2u._merge_zero_shards = _merge_fp32_shards
    unmatched = original(uc_info, dir, slice_dir, tp_degree, name_and_shapes)
    for key in _FLAT_KEYS:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(dir, name_and_shapes[0], f"{key}.pt"))
    return unmatched


def _extract_fp32_shards_stage3(optim_files_grid, param_shapes_grid, dp_degree, temp_dir, indices,
                                exclude_param_names=None):
    """``extract_zero_shards_stage3`` for the fp32 weights alone (DeepSpeed's also reads ``state[i]["exp_avg"]``)."""
    from deepspeed.checkpoint import ds_to_universal as d2u

    tp_index, dp_index = indices
    optim_sd = torch.load(optim_files_grid[tp_index][dp_index], map_location="cpu",
                          weights_only=False)[d2u.OPTIMIZER_STATE_DICT]
    for idx, sub_group_shape in enumerate(param_shapes_grid[tp_index]):
        fp32, offset = optim_sd["fp32_flat_groups"][idx], 0
        for name, shape in sub_group_shape.items():
            numel = d2u._shape_numel(shape)
            piece = -(-numel // dp_degree)
            if name not in (exclude_param_names or ()):
                d2u.dump_param_fragment(temp_dir, tp_index, dp_index, "fp32", fp32, name, offset,
                                        zero3_piece(numel, dp_degree, dp_index))
            offset += piece


def _merge_zero3_fp32(dp_degree, dir, slice_dir, name):
    """``merge_zero3_slices`` for the fp32 weights; ``exp_avg`` / ``exp_avg_sq`` are zero-filled placeholders, which
    DeepSpeed's stage-3 loader reads for every parameter (sara_ds's state is in the sidecar)."""
    from deepspeed.checkpoint import ds_to_universal as d2u

    fp32 = d2u._merge_zero_shards(os.path.join(slice_dir, name), "fp32", 1)[0]
    d2u._save_checkpoint(os.path.join(dir, name, "fp32.pt"), fp32)
    for key in _FLAT_KEYS:
        d2u._save_checkpoint(os.path.join(dir, name, f"{key}.pt"), torch.zeros_like(fp32))


def _save_stage3_global_state(args, optim_files):
    """``zero/optimizer_state.pt`` without sara_ds's state (DeepSpeed's loader reads ``state[0]["step"]`` and the
    param groups' hyperparameters from it; the restore puts every group's own back)."""
    from deepspeed.checkpoint import ds_to_universal as d2u

    sd = torch.load(optim_files[0], map_location="cpu", weights_only=False)[d2u.OPTIMIZER_STATE_DICT]
    inner = sd[d2u.OPTIMIZER_STATE_DICT]
    sd[d2u.OPTIMIZER_STATE_DICT] = {"state": {0: {"step": 0}}, "param_groups": inner["param_groups"]}
    sd.pop("fp32_flat_groups", None)
    sd[d2u.PARAM_GROUPS] = inner["param_groups"]
    d2u._save_checkpoint(os.path.join(args.output_folder, "zero", "optimizer_state.pt"), sd)


@contextlib.contextmanager
def _fp32_only_conversion():
    """DeepSpeed's ZeRO-1/2 conversion with only the fp32 weights of each flat partition extracted and merged.
    The stand-ins are module-level functions, so its worker processes can unpickle them."""
    from deepspeed.checkpoint import ds_to_universal as d2u

    original = _originals(d2u)
    d2u.extract_zero_shards, d2u.merge_tp_slices = _extract_fp32_shards, _merge_fp32_tp_slices
    d2u.extract_zero_shards_stage3, d2u.merge_zero3_slices = _extract_fp32_shards_stage3, _merge_zero3_fp32
    d2u._save_optimizer_state_stage3 = _save_stage3_global_state
    try:
        yield d2u
    finally:
        d2u.extract_zero_shards, d2u._merge_zero_shards, d2u.merge_tp_slices = (original["extract"],
                                                                                original["merge_shards"],
                                                                                original["merge_tp"])
        d2u.extract_zero_shards_stage3, d2u.merge_zero3_slices = original["extract3"], original["merge3"]
        d2u._save_optimizer_state_stage3 = original["save3"]


def convert(input_folder: str, output_folder: str, num_extract_workers: int = 4, num_merge_workers: int = 2,
            keep_temp_folder: bool = False, strict: bool = True) -> dict:
    """DeepSpeed's ``ds_to_universal`` for a checkpoint written with a sara_ds optimizer (see the module doc)."""
    collected = collect_state(input_folder)
    args = argparse.Namespace(input_folder=input_folder, output_folder=output_folder,
                              num_extract_workers=num_extract_workers, num_merge_workers=num_merge_workers,
                              keep_temp_folder=keep_temp_folder, strict=strict,
                              inject_missing_state=True)  # only where the client state lacks it (TP = 1 here)
    if collected is None:  # no sara_ds state: DeepSpeed's conversion as it is
        from deepspeed.checkpoint import ds_to_universal as d2u

        d2u.main(args)
        return {"matrices": 0}
    with _fp32_only_conversion() as d2u:
        d2u.main(args)
    leftovers = [p for key in _FLAT_KEYS for p in glob.glob(os.path.join(output_folder, "zero", "*", f"{key}.pt"))
                 if collected["zero_stage"] != 3 or torch.load(p, weights_only=False).count_nonzero()]
    if leftovers:
        raise RuntimeError(f"sara_ds: the conversion left flat optimizer state that would be loaded as sara_ds state: "
                           f"{leftovers[:3]}")
    sidecar = os.path.join(output_folder, SIDECAR)
    os.makedirs(os.path.dirname(sidecar), exist_ok=True)
    torch.save(collected, sidecar + ".tmp")
    os.replace(sidecar + ".tmp", sidecar)
    projected = sum("basis" in st for st in collected["matrices"].values())
    print(f"[sara_ds] wrote the state of {len(collected['matrices'])} parameters ({projected} projected; saved at "
          f"DP={collected['dp_size']}) to {sidecar}")
    return {"matrices": len(collected["matrices"]), "sidecar": sidecar}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sara_ds.ds_to_universal",
        description="DeepSpeed's ds_to_universal for checkpoints written with a sara_ds optimizer (ZeRO-1/2/3): the "
                    "fp32 weights in DeepSpeed's universal layout, and sara_ds's per-matrix state in "
                    f"<output_folder>/{SIDECAR}. Load with \"checkpoint\": {{\"load_universal\": true}} and "
                    "engine.load_checkpoint, at any data-parallel size.")
    ap.add_argument("--input_folder", required=True, help="one tag of a DeepSpeed checkpoint, e.g. ckpt/global_step6")
    ap.add_argument("--output_folder", required=True, help="the universal checkpoint to write, e.g. ckpt/u6")
    ap.add_argument("--num_extract_workers", type=int, default=4)
    ap.add_argument("--num_merge_workers", type=int, default=2)
    ap.add_argument("--keep_temp_folder", action="store_true")
    ap.add_argument("--no_strict", dest="strict", action="store_false")
    a = ap.parse_args(argv)
    convert(a.input_folder, a.output_folder, a.num_extract_workers, a.num_merge_workers, a.keep_temp_folder, a.strict)


# ------------------------------------------------------------------------------------------ loading


def guard_until_loaded(engine, optimizer) -> None:
    """``checkpoint.load_universal``: the engine's ``load_checkpoint`` also restores sara_ds's state, and the
    optimizer refuses to step before it has (it would start every matrix's moments and basis afresh)."""
    real_step = optimizer.step

    @functools.wraps(real_step)
    def refuse(*args, **kwargs):
        raise RuntimeError(
            "sara_ds: checkpoint.load_universal=true, but no universal checkpoint has been loaded into this engine: "
            "call engine.load_checkpoint(dir, tag) on a folder written by `python -m sara_ds.ds_to_universal` before "
            "training (or remove checkpoint.load_universal to start afresh)")

    optimizer.step = refuse
    real_load = engine.load_checkpoint

    signature = inspect.signature(real_load)

    @functools.wraps(real_load)
    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        given = signature.bind(load_dir, tag, *args, **kwargs)
        given.apply_defaults()
        with_state = given.arguments["load_optimizer_states"] and not given.arguments["load_module_only"]
        if tag is None:  # as DeepSpeed resolves it, to find the sidecar
            latest = os.path.join(load_dir, "latest_universal")
            tag = open(latest).read().strip() if os.path.isfile(latest) else None
        folder = os.path.join(load_dir, tag) if tag is not None else None
        if with_state and folder is not None and not os.path.isfile(os.path.join(folder, SIDECAR)):
            raise FileNotFoundError(
                f"sara_ds: {os.path.join(folder, SIDECAR)} is missing: this universal checkpoint was not written by "
                "`python -m sara_ds.ds_to_universal` (DeepSpeed's own conversion cannot carry sara_ds's state), so "
                "every low-rank moment and basis would be lost. Convert the original checkpoint with it.")
        out = real_load(load_dir, tag, *args, **kwargs)
        if out[0] is not None:
            if with_state:
                restore_state(optimizer, os.path.join(folder, SIDECAR), engine)
            optimizer.step = real_step  # load_optimizer_states=False: a deliberate fresh start
        return out

    engine.load_checkpoint = load_checkpoint


def _partitions(optimizer, engine):
    """(param group, fp32 partition, its Layout without steppers) for every partition, in the order DeepSpeed steps
    them; and a function that chooses a layout's steppers as a step would."""
    from ..sharding import zero

    placement, stage3 = optimizer.placement, getattr(engine, "optimizer", None)
    flats = getattr(stage3, "fp32_partitioned_groups_flat", None)
    if flats is None:  # ZeRO-1/2: the flat partitions are in the param groups
        out = []
        for group in optimizer.param_groups:
            for flat in group["params"]:
                if not zero.is_flat_partition([flat], optimizer.original_params):
                    raise RuntimeError("sara_ds: a universal checkpoint restores into ZeRO flat partitions only")
                out.append((group, flat, zero.build_layout(flat, optimizer.group_members[group["sara_group"]],
                                                           optimizer.original_params, placement.tp_group)))
        return out, lambda group, layout: zero.choose_steppers(
            layout, optimizer.original_params, lambda i: optimizer._needs_full_matrix(group, i))
    out = []
    for sub_group, flat in enumerate(flats):  # ZeRO-3 empties the param groups between its per-sub-group steps
        group = optimizer.param_groups[stage3.sub_group_to_group_id[sub_group]]
        out.append((group, flat, zero.build_zero3_layout(flat, optimizer.group_members[group["sara_group"]],
                                                         optimizer.original_params)))
    placement.layouts.loads = [0] * torch.distributed.get_world_size(out[0][2].group) if out else None

    def choose(group, layout):  # the loads carry over from sub-group to sub-group, as in a step
        return zero.choose_zero3_steppers(layout, lambda i: optimizer._needs_full_matrix(group, i),
                                          lambda i: optimizer._state_numel(group, i), placement.layouts.loads)
    return out, choose


def restore_state(optimizer, sidecar: str, engine=None) -> None:
    """Give each rank the saved state of the matrices it owns in the (new) ZeRO partitions."""
    import torch.distributed as dist

    saved = torch.load(sidecar, map_location="cpu", weights_only=False)
    if saved.get("format") != _FORMAT:
        raise ValueError(f"sara_ds: {sidecar} has format {saved.get('format')}, this sara_ds reads {_FORMAT}")
    matrices = saved["matrices"]
    placement = optimizer.placement
    placement.clear()
    optimizer.banks.clear()
    if hasattr(getattr(engine, "optimizer", None), "fp32_partitioned_groups_flat"):
        # DeepSpeed's stage-3 loader gave every group the first group's hyperparameters: put each group's back
        for group, hyper in zip(optimizer.param_groups, saved["param_groups"], strict=True):
            group.update({k: v for k, v in hyper.items() if k != "params"})
    partitions, choose = _partitions(optimizer, engine)
    restored, layout = set(), None
    for group, flat, layout in partitions:
        placement.layouts[id(flat)] = layout
        layout.steppers = choose(group, layout)
        owned = [f.index for f in layout.fragments if layout.steps(f.index)]
        have = [i for i in owned if i in matrices]
        if not have:
            optimizer.state.pop(flat, None)
            continue
        missing = sorted(set(owned) - set(have))
        if missing:
            names = [saved["names"].get(i, i) for i in missing[:6]]
            raise RuntimeError(f"sara_ds: {sidecar} has state for some matrices of param group "
                               f"{group['sara_group']} but not for {names}: the checkpoint is incomplete")
        optimizer.state[flat] = {f.index: _to_device(_piece(matrices[f.index], f, optimizer, group), flat.device)
                                 for f in layout.fragments if layout.steps(f.index)}
        restored.update(have)
    everyone = [None] * (dist.get_world_size(layout.group) if layout is not None else 1)
    if layout is not None and len(everyone) > 1:
        dist.all_gather_object(everyone, sorted(restored), group=layout.group)
    else:
        everyone = [sorted(restored)]
    dropped = set(matrices) - set().union(*map(set, everyone))
    if dropped:
        raise RuntimeError(f"sara_ds: no rank owns matrices {[saved['names'].get(i, i) for i in sorted(dropped)[:6]]} "
                           f"of {sidecar}: the model or its parameter groups differ from the saved run's")


def _piece(state: dict, fragment, optimizer, group) -> dict:
    """The state of this rank's piece: the whole matrix's, or, for an elementwise base's full-rank straddler
    (stepped piece by piece, ``sharding.zero``), the elements of its piece."""
    from ..sharding import numel_of

    numel = numel_of(optimizer.original_params[fragment.index])
    if fragment.numel == numel or optimizer._needs_full_matrix(group, fragment.index):
        return state
    return {k: v.reshape(-1).narrow(0, fragment.lp_start, fragment.numel) if isinstance(v, torch.Tensor)
            and v.numel() == numel else v for k, v in state.items()}


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, copy=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
