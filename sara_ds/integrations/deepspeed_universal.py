"""Resuming a DeepSpeed ZeRO-1/2/3 run at another data-parallel size: DeepSpeed's universal checkpoint, written from
the checkpoint's files alone, with sara_ds's state carried beside it.

    python -m sara_ds.ds_to_universal --input_folder ckpt/global_step6 --output_folder ckpt/u6
    # then "checkpoint": {"load_universal": true} in the config, and
    # sara_ds.integrations.deepspeed.load_checkpoint(engine, "ckpt")   (reads ckpt/latest_universal)

The universal layout is the contract, read by DeepSpeed's public loader: ``zero/<parameter>/fp32.pt`` (and one file
per per-element optimizer state, ``{"param": tensor}``), ``zero/optimizer_state.pt`` (the global state) and the
model states. DeepSpeed's own ``ds_to_universal`` writes it only for state keyed ``exp_avg`` / ``exp_avg_sq``, so
it dies on sara_ds's per-matrix state and on any optimizer whose state is not Adam's (DeepSpeed issue #8608).
``convert`` reads ``*_optim_states.pt`` and ``*model_states.pt`` with ``torch.load`` and writes the layout itself:

* every parameter's fp32 weight, and every per-element optimizer state a flat partition holds (a tensor the size of
  the partition: AdamW's moments, whatever their names), cut by position and joined in DP-rank order, so a stock
  optimizer's checkpoint converts as well;
* for a sara_ds optimizer, every matrix's state once, in ``sara_ds/optimizer_state.pt``. A straddler's copies must
  agree bit for bit, and every matrix the optimizer ever stepped must be there, or the conversion fails.

``sara_ds.integrations.deepspeed.load_checkpoint(engine, dir)`` does the rest: DeepSpeed's own
``engine.load_checkpoint`` puts the fp32 weights into the new partitions, then each rank takes the state of the
matrices it now steps (``DeepSpeedLayout``). Matrix ids and the refresh generator (seed,
matrix id, step // gap) do not depend on the data-parallel size, so the resumed run draws the same subspaces.

At ZeRO-3 DeepSpeed's loader also reads ``exp_avg`` / ``exp_avg_sq`` files for every parameter, the ``step`` of the
first sub-group's state, and copies the first param group's hyperparameters into every group. For sara_ds the
converter writes zero-filled placeholders for the first two, and the restore puts each group's own
hyperparameters back and replaces what DeepSpeed put into the optimizer's state with sara_ds's.

An engine built with ``load_universal`` that steps before such a load would start every moment and basis afresh;
its optimizer refuses to step until the load has run. Nothing of DeepSpeed's is replaced or wrapped at run time.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import shutil

import torch

from .. import checkpoints
from ..optim import by_matrix_id
from ..sharding.tensor_parallel import SPLIT_STATE
from ..sharding.zero import zero3_piece

SIDECAR = os.path.join("sara_ds", "optimizer_state.pt")
_FORMAT = 1
_FLAT_KEYS = ("exp_avg", "exp_avg_sq")  # what DeepSpeed's stage-3 loader reads for every parameter


# ------------------------------------------------------------------------------------------ conversion


def _is_sara(optimizer_state: dict) -> bool:
    return any("sara_group" in group for group in optimizer_state["param_groups"])


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


def matrices_of(model_states: dict) -> tuple[dict, dict]:
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


def merge_zero3(index: int, name: str, shape: tuple, copies: list) -> dict:
    """At ZeRO-3 a matrix stepped whole has one stepper, so one copy; one stepped in row blocks has one block per
    rank; an elementwise base's matrix has one piece per rank that holds elements of it."""
    if any("row_block" in st for st, _, _ in copies):
        return _join_row_blocks(index, name, copies)
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


def _join_row_blocks(index: int, name: str, copies: list) -> dict:
    """One process's state of a matrix stepped in ZeRO-3 row blocks: the split statistics (R's columns, which are
    the matrix's rows) joined in row order, everything else the same on every rank, bit for bit."""
    if not all("row_block" in st for st, _, _ in copies):
        raise RuntimeError(f"sara_ds: matrix {index} ({name}) has row-block state on some DP ranks and whole-matrix "
                           f"state on others ({[r for _, _, r in copies]}): the ZeRO-3 checkpoint is inconsistent")
    blocks = sorted(copies, key=lambda c: c[0]["row_block"][0])
    end, total = 0, blocks[0][0]["row_block"][2]
    for st, _, rank in blocks:
        if st["row_block"][0] != end or st["row_block"][2] != total:
            raise RuntimeError(f"sara_ds: the row blocks of {name} (matrix {index}) saved by DP ranks "
                               f"{[r for _, _, r in blocks]} are {[c[0]['row_block'] for c in blocks]}: they do not "
                               f"tile its {total} rows, so the checkpoint is incomplete")
        end = st["row_block"][1]
    if end != total:
        raise RuntimeError(f"sara_ds: the row blocks of {name} (matrix {index}) cover rows 0..{end - 1} of {total}: "
                           "the checkpoint is incomplete")
    first = blocks[0][0]
    merged = {}
    for key, value in first.items():
        if key == "row_block":
            continue
        if key in SPLIT_STATE:
            merged[key] = torch.cat([st[key] for st, _, _ in blocks], dim=-1)
        elif all(_equal(value, st[key]) for st, _, _ in blocks[1:]):
            merged[key] = value
        else:
            raise RuntimeError(f"sara_ds: the row blocks of {name} (matrix {index}) disagree on {key!r}, which every "
                               "rank holds whole: the checkpoint is inconsistent (written by ranks at different steps?)")
    return merged


def row_block_state(state: dict, rows: tuple) -> dict:
    """One process's state of a matrix, cut to the rows ``(first, end, total)`` a ZeRO-3 rank steps."""
    first, end, _ = rows
    out = {k: v.narrow(-1, first, end - first) if k in SPLIT_STATE else v for k, v in state.items() if k != "row_block"}
    return dict(out, row_block=list(rows))


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
    ids, shapes = matrices_of(checkpoints.load_file(models[0], map_location="cpu", weights_only=False))
    names = {i: name for name, i in ids.items()}
    copies, groups, stage = {}, None, None
    for path in files:
        sd = checkpoints.load_file(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        stage = int(sd.get("zero_stage", 0))
        if stage == 3:
            inner = sd["optimizer_state_dict"]
            groups = inner["param_groups"]
            for index, st in by_matrix_id(inner["state"]).items() if _is_sara(inner) else ():
                piece = zero3_piece(math.prod(shapes[index]), len(files), _dp_rank(path))
                copies.setdefault(index, []).append((st, piece, _dp_rank(path)))
            continue
        if "base_optimizer_state" not in sd:
            raise ValueError(f"sara_ds: {os.path.basename(path)} is a ZeRO stage {sd.get('zero_stage')} file; "
                             "sara_ds converts stages 1, 2 and 3")
        base_state = sd["base_optimizer_state"]
        groups = base_state["param_groups"]
        if not _is_sara(base_state):
            continue
        state = by_matrix_id(base_state["state"])
        for mappings in sd["param_slice_mappings"]:
            for name, fragment in mappings.items():
                if ids[name] in state:
                    copies.setdefault(ids[name], []).append((state[ids[name]], fragment.numel, _dp_rank(path)))
    if not copies:
        return None
    merge = merge_zero3 if stage == 3 else _merge_copies
    matrices = {i: merge(i, names[i], shapes[i], held) for i, held in sorted(copies.items())}
    return {"format": _FORMAT, "matrices": matrices, "names": names, "shapes": shapes, "dp_size": len(files),
            "zero_stage": stage, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups]}


def _fragments_zero12(files: list) -> dict:
    """name -> {state key: [this rank's piece of it, in DP-rank order]}: the fp32 weight and every per-element
    optimizer state (a tensor the size of its flat partition: AdamW's moments) of a ZeRO-1/2 checkpoint, cut by
    ``param_slice_mappings``. A partition is one contiguous run of its group's flattened parameters, so a
    parameter's pieces in DP-rank order are the parameter."""
    pieces: dict = {}
    for path in files:
        sd = checkpoints.load_file(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        flat_state = {} if _is_sara(base) else base["state"]
        for g, mappings in enumerate(sd["param_slice_mappings"]):
            fp32 = sd["single_partition_of_fp32_groups"][g]
            per_element = {k: v for k, v in flat_state.get(g, {}).items()
                           if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() >= fp32.numel()}
            for name, fragment in mappings.items():
                mine = pieces.setdefault(name, {})
                mine.setdefault("fp32", []).append(fp32.narrow(0, fragment.start, fragment.numel))
                for key, value in per_element.items():
                    mine.setdefault(key, []).append(value.narrow(0, fragment.start, fragment.numel))
                if "step" in flat_state.get(g, {}):
                    mine.setdefault("step", []).append(flat_state[g]["step"])
    return pieces


def _fragments_zero3(files: list, param_shapes: list) -> dict:
    """The same for ZeRO-3: each sub-group's fp32 partition (and per-element state) holds, for every parameter of
    the sub-group in order, this rank's piece of ``ceil(numel / DP)`` elements, the last one padded."""
    pieces: dict = {}
    world = len(files)
    for path in files:
        rank = _dp_rank(path)
        sd = checkpoints.load_file(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner = sd["optimizer_state_dict"]
        for index, shapes in enumerate(param_shapes):
            fp32 = sd["fp32_flat_groups"][index]
            flat_state = {} if _is_sara(inner) else inner["state"].get(index, {})
            per_element = {k: v for k, v in flat_state.items()
                           if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == fp32.numel()}
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                mine, held = pieces.setdefault(name, {}), zero3_piece(numel, world, rank)
                for key, flat in (("fp32", fp32), *per_element.items()):
                    mine.setdefault(key, []).append(flat.narrow(0, offset, held))
                if "step" in flat_state:
                    mine.setdefault("step", []).append(flat_state["step"])
                offset += -(-numel // world)
    return pieces


def _write_parameters(pieces: dict, shapes: dict, folder: str, placeholders: bool) -> None:
    """``zero/<name>/<key>.pt`` for every parameter: the fp32 weight and each per-element state as
    ``{"param": tensor shaped like the parameter}``, and its step as it was saved: the layout DeepSpeed's universal
    loader reads. ``placeholders``: zero-filled ``exp_avg`` / ``exp_avg_sq``, which its stage-3 loader reads for
    every parameter (sara_ds's own state is in the sidecar)."""
    for name, by_key in pieces.items():
        if name not in shapes:
            raise RuntimeError(f"sara_ds: the optimizer files hold {name}, which the model states do not name")
        shape = torch.Size(shapes[name])
        out = os.path.join(folder, "zero", name)
        os.makedirs(out, exist_ok=True)
        for key, parts in by_key.items():
            if key == "step":
                if any(not _equal(p, parts[0]) for p in parts[1:]):
                    raise RuntimeError(f"sara_ds: the pieces of {name} disagree on their step count: {parts}")
                checkpoints.atomic_save(parts[0], os.path.join(out, "step.pt"))
                continue
            full = torch.cat(parts)
            if full.numel() != shape.numel():
                raise RuntimeError(f"sara_ds: the pieces of {name}'s {key} hold {full.numel()} elements, its shape "
                                   f"{tuple(shape)} has {shape.numel()}: the checkpoint is incomplete")
            checkpoints.atomic_save({"param": full.view(shape)}, os.path.join(out, f"{key}.pt"))
            if key == "fp32" and placeholders:
                for flat_key in _FLAT_KEYS:
                    checkpoints.atomic_save({"param": torch.zeros(shape)}, os.path.join(out, f"{flat_key}.pt"))


def _global_state(first_file: str, stage: int) -> dict:
    """``zero/optimizer_state.pt``: what the loader reads besides the parameters (loss scaler, clipping, the param
    groups' hyperparameters; at stage 3 also the first sub-group's ``step``), without any rank's partitions."""
    sd = checkpoints.load_file(first_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    if stage == 3:
        inner = sd.pop("optimizer_state_dict")
        sd.pop("fp32_flat_groups", None)
        first = inner["state"].get(0, {}) if not _is_sara(inner) else {}
        sd["optimizer_state_dict"] = {"state": {0: {"step": first.get("step", 0)}},
                                      "param_groups": inner["param_groups"]}
        sd["param_groups"] = inner["param_groups"]
        return sd
    base = sd["base_optimizer_state"]
    out = {k: v for k, v in sd.items()
           if k not in ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")}
    out["param_groups"] = base["param_groups"]
    return out


def convert(input_folder: str, output_folder: str) -> dict:
    """A DeepSpeed ZeRO-1/2/3 checkpoint tag (``*_optim_states.pt``, ``*model_states.pt``) in DeepSpeed's universal
    layout, read from the files alone: every parameter's fp32 weight and per-element optimizer state (by position,
    so stock AdamW's moments as well), the global optimizer state, the model states, ``latest_universal`` beside
    the output folder, and, for a sara_ds optimizer, every matrix's state once in ``sara_ds/optimizer_state.pt``."""
    optim_files = sorted(glob.glob(os.path.join(input_folder, "*_optim_states.pt")), key=_dp_rank)
    collected = collect_state(input_folder)  # checks the files, the model-parallel size and sara_ds's state
    models = _model_files(input_folder)
    stage = int(checkpoints.load_file(optim_files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
                .get("zero_stage", 0))
    model_states = checkpoints.load_file(models[0], map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    if stage == 3:
        pieces = _fragments_zero3(optim_files, model_states["param_shapes"])
    else:
        pieces = _fragments_zero12(optim_files)
    _write_parameters(pieces, shapes, output_folder, placeholders=stage == 3 and collected is not None)
    checkpoints.atomic_save(_global_state(optim_files[0], stage), os.path.join(output_folder, "zero", "optimizer_state.pt"))
    for path in models:
        shutil.copy2(path, os.path.join(output_folder, os.path.basename(path)))
    report = {"parameters": len(pieces), "matrices": 0, "zero_stage": stage}
    if collected is not None:
        sidecar = os.path.join(output_folder, SIDECAR)
        os.makedirs(os.path.dirname(sidecar), exist_ok=True)
        checkpoints.atomic_save(collected, sidecar)
        projected = sum("basis" in st for st in collected["matrices"].values())
        print(f"[sara_ds] wrote the state of {len(collected['matrices'])} parameters ({projected} projected; saved "
              f"at DP={collected['dp_size']}) to {sidecar}")
        report.update(matrices=len(collected["matrices"]), sidecar=sidecar)
    root, tag = os.path.split(os.path.normpath(output_folder))
    with open(os.path.join(root, "latest_universal.tmp"), "w") as f:
        f.write(tag)
    os.replace(os.path.join(root, "latest_universal.tmp"), os.path.join(root, "latest_universal"))
    print(f"[sara_ds] universal checkpoint of {len(pieces)} parameters (ZeRO-{stage}, DP={len(optim_files)}) "
          f"written to {output_folder}")
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sara_ds.ds_to_universal",
        description="A DeepSpeed ZeRO-1/2/3 checkpoint in DeepSpeed's universal layout, from its files alone: the fp32 "
                    "weights and any per-element optimizer state (stock AdamW's too), and a sara_ds optimizer's "
                    "per-matrix state in "
                    f"<output_folder>/{SIDECAR}. Load with \"checkpoint\": {{\"load_universal\": true}} and "
                    "sara_ds.integrations.deepspeed.load_checkpoint(engine, dir), at any data-parallel size.")
    ap.add_argument("--input_folder", required=True, help="one tag of a DeepSpeed checkpoint, e.g. ckpt/global_step6")
    ap.add_argument("--output_folder", required=True, help="the universal checkpoint to write, e.g. ckpt/u6")
    for flag in ("--num_extract_workers", "--num_merge_workers"):  # DeepSpeed's command's: one process reads here
        ap.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    convert(a.input_folder, a.output_folder)


# ------------------------------------------------------------------------------------------ loading


NOT_LOADED = ("sara_ds: checkpoint.load_universal=true, but no universal checkpoint has been loaded into this engine's "
              "optimizer: call sara_ds.integrations.deepspeed.load_checkpoint(engine, dir) on a folder written by "
              "`python -m sara_ds.ds_to_universal` before training (engine.load_checkpoint alone restores the weights "
              "but not sara_ds's state), or remove checkpoint.load_universal to start afresh")


def load_universal(engine, optimizer, load_dir: str, tag: str | None, **kwargs):
    """``engine.load_checkpoint`` of a universal checkpoint, then each rank takes the sara_ds state of the matrices
    it now steps from the sidecar (``sara_ds.integrations.deepspeed.load_checkpoint`` comes here)."""
    with_state = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
    folder = os.path.join(load_dir, tag)
    if with_state and not os.path.isfile(os.path.join(folder, SIDECAR)):
        raise FileNotFoundError(
            f"sara_ds: {os.path.join(folder, SIDECAR)} is missing: this universal checkpoint was not written by "
            "`python -m sara_ds.ds_to_universal` (DeepSpeed's own conversion cannot carry sara_ds's state), so "
            "every low-rank moment and basis would be lost. Convert the original checkpoint with it.")
    out = engine.load_checkpoint(load_dir, tag, **kwargs)
    if out[0] is not None:
        if with_state:
            restore_state(optimizer, os.path.join(folder, SIDECAR), engine)
        optimizer.layout.universal_pending = False  # loaded, or a deliberate fresh start without the state
    return out


def _partitions(optimizer, engine) -> list:
    """(param group, fp32 partition) for every partition, in the order DeepSpeed steps them."""
    stage3 = getattr(engine, "optimizer", None)
    flats = getattr(stage3, "fp32_partitioned_groups_flat", None)
    if flats is None:  # ZeRO-1/2: the flat partitions are in the param groups
        return [(group, flat) for group in optimizer.param_groups for flat in group["params"]]
    # ZeRO-3 empties the param groups between its per-sub-group steps
    return [(optimizer.param_groups[stage3.sub_group_to_group_id[i]], flat) for i, flat in enumerate(flats)]


def restore_state(optimizer, sidecar: str, engine=None) -> None:
    """Give each rank the saved state of the matrices it owns in the (new) ZeRO partitions."""
    import torch.distributed as dist

    saved = checkpoints.load_file(sidecar, map_location="cpu", weights_only=False)
    if saved.get("format") != _FORMAT:
        raise ValueError(f"sara_ds: {sidecar} has format {saved.get('format')}, this sara_ds reads {_FORMAT}")
    problems = checkpoints.differences(saved["param_groups"], optimizer.built, optimizer.accept_changes)
    if problems:
        raise ValueError(f"sara_ds: {sidecar} was written by an optimizer built otherwise:\n  " + "\n  ".join(problems))
    matrices, layout = saved["matrices"], optimizer.layout
    checkpoints.check_states(matrices, optimizer.matrices, optimizer.param_groups, optimizer.base, sidecar)
    layout.reset()
    optimizer.banks.clear()
    optimizer.state.clear()  # and whatever DeepSpeed's stage-3 loader put there for the flat partitions
    if hasattr(getattr(engine, "optimizer", None), "fp32_partitioned_groups_flat"):
        # DeepSpeed's stage-3 loader gave every group the first group's hyperparameters: put each group's back
        for group, hyper in zip(optimizer.param_groups, saved["param_groups"], strict=True):
            group.update({k: v for k, v in hyper.items() if k != "params"})
    restored, partition = set(), None
    for group, flat in _partitions(optimizer, engine):
        partition = layout.partition(flat, optimizer.group_members[group["sara_group"]], group)
        owned = [f for f in partition.fragments if partition.steps(f.index)]
        missing = sorted(f.index for f in owned if f.index not in matrices)
        if missing and len(missing) < len(owned):
            names = [saved["names"].get(i, i) for i in missing[:6]]
            raise RuntimeError(f"sara_ds: {sidecar} has state for some matrices of param group "
                               f"{group['sara_group']} but not for {names}: the checkpoint is incomplete")
        for f in owned if not missing else ():
            state = _piece(matrices[f.index], f, optimizer.matrices[f.index])
            if f.index in partition.rows and "basis" in state:
                first, end = partition.rows[f.index][partition.rank]
                state = row_block_state(state, (first, end, optimizer.matrices[f.index].shape[0]))
            optimizer.state[f.index] = _to_device(state, flat.device)
            restored.add(f.index)
    everyone = [None] * (dist.get_world_size(partition.group) if partition is not None else 1)
    if partition is not None and len(everyone) > 1:
        dist.all_gather_object(everyone, sorted(restored), group=partition.group)
    else:
        everyone = [sorted(restored)]
    dropped = set(matrices) - set().union(*map(set, everyone))
    if dropped:
        raise RuntimeError(f"sara_ds: no rank owns matrices {[saved['names'].get(i, i) for i in sorted(dropped)[:6]]} "
                           f"of {sidecar}: the model or its parameter groups differ from the saved run's")


def _piece(state: dict, fragment, matrix) -> dict:
    """The state of this rank's piece: the whole matrix's, or, for an elementwise base's full-rank straddler
    (stepped piece by piece, ``sharding.zero``), the elements of its piece."""
    numel = matrix.shape.numel()
    if fragment.numel == numel or matrix.whole:
        return state
    return {k: v.reshape(-1).narrow(0, fragment.lp_start, fragment.numel) if isinstance(v, torch.Tensor)
            and v.numel() == numel else v for k, v in state.items()}


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, copy=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
