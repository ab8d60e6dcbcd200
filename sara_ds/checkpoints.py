"""What a saved optimizer state must agree on with the optimizer it is loaded into, and the files sara_ds reads and
writes itself.

``state_dict()`` records, per param group, what the optimizer was built with (every hyperparameter, the base, and
the members' shapes in order). ``load_state_dict`` compares all but how a step runs (``EXECUTION``: the
optimizer's own value stands) and what training changes (``PROGRESS``: restored): a difference is an error that
lists every one, unless the key is one a resumed run can change safely and the
caller accepted it (``ACCEPTABLE``; ``load_state_dict(sd, accept=("update_proj_gap",))`` or the constructor's
``accept_changes``): the optimizer's own value then stands. Each matrix's state is checked too: its keys are the
base's, and its bases and moments are finite. A galore-torch ``GaLoreAdamW`` state is refused with the way to
convert it (``from_galore_torch``).
"""
from __future__ import annotations

import math
import os

import torch

# The group keys a loaded state may differ in on request: the optimizer's value then stands (lr and decay act at once, a gap at the
# next refresh, a scale at the next step). ``lr`` compares the lr the optimizer was built with (lr_at_start): the
# current lr of a schedule is the checkpoint's to restore.
ACCEPTABLE = ("lr", "update_proj_gap", "scale", "weight_decay")
GROUP_KEY = {"lr": "lr_at_start"}  # where an accepted change is compared in a param group
# How a step runs, not what the state means: the optimizer's own value stands, whatever the checkpoint says
# (a run resumed on other hardware may step in banks, fused or with the flag on the device).
EXECUTION = ("foreach", "fused", "finite_flag", "in_place_min_numel")
# What training changes: the checkpoint's value is restored (the scheduled lr, the skip count)
PROGRESS = ("lr", "skipped_steps")
# Every other key the optimizer was built with is compared: betas, eps, the seed, the spectra, the signs...
_NOT_COMPARED = {"params", "sara_group"} | set(EXECUTION) | set(PROGRESS)

# which base made a state, by the keys only it has (a state of another base is refused by name)
BASE_KEYS = {"adamw": {"exp_avg", "exp_avg_sq"}, "adafactor": {"exp_avg_sq_row", "exp_avg_sq_col"},
             "adam_mini": {"v_block"}}  # for naming the base a refused state came from
_MAY_BE_INFINITE = {"fira_norm"}  # +inf before Fira's first step


def is_template_step(state: dict, param_groups: list, grads: list) -> bool:
    """torch.distributed.checkpoint's get/set_state_dict build an empty optimizer's state with one step of zero
    gradients at lr 0: the state that step makes is a template for a load, and counts as no step and no refresh."""
    return (not any(isinstance(k, int) for k in state) and all(g["lr"] == 0 for g in param_groups)
            and all(not g.any() for g in grads))


def forget_template_step(state: dict) -> None:
    for st in (st for i, st in state.items() if isinstance(i, int)):
        st.update({k: 0 for k in ("step", "base_step", "refreshes") if k in st})


def accepted(keys) -> tuple:
    """The changes a load may accept, checked: ``ACCEPTABLE`` names only."""
    keys = (keys,) if isinstance(keys, str) else tuple(keys or ())
    unknown = sorted(set(keys) - set(ACCEPTABLE))
    if unknown:
        raise ValueError(f"sara_ds: accept_changes={list(keys)}: a checkpoint can change only {list(ACCEPTABLE)}, "
                         f"not {unknown}")
    return keys


def record(group: dict, shapes: list, base: str) -> dict:
    """A param group as ``state_dict`` saves it: its hyperparameters, its members' shapes and the base."""
    return dict(group, sara_shapes=[list(s) for s in shapes], sara_base=base)


def differences(saved_groups: list, built: list, accept=()) -> list[str]:
    """Every way the saved groups differ from the ``record`` of each group the optimizer was built with, but for
    the accepted keys. Keys a checkpoint does not have (an older sara_ds's) are not compared."""
    if len(saved_groups) != len(built):
        return [f"the state holds {len(saved_groups)} param groups, this optimizer {len(built)}"]
    accept = accepted(accept)
    ours = built
    skipped = {GROUP_KEY.get(k, k) for k in accept}
    found = []
    for i, (saved, now) in enumerate(zip(saved_groups, ours)):
        if "sara_shapes" in saved and len(saved["sara_shapes"]) != len(now["sara_shapes"]):
            found.append(f"param group {i}: {len(saved['sara_shapes'])} parameters saved, {len(now['sara_shapes'])} "
                         "now")
            continue
        for key in now:
            if key in saved and key not in _NOT_COMPARED and key not in skipped and not _same(saved[key], now[key]):
                found.append(f"param group {i}: {_shown(key)} saved {_value(key, saved[key])}, "
                             f"now {_value(key, now[key])}")
    return found


def refuse_differences(saved_groups: list, built: list, accept=()) -> None:
    problems = differences(saved_groups, built, accept)
    if problems:
        raise ValueError("sara_ds: the optimizer state was saved by one built otherwise:\n  " + "\n  ".join(problems)
                         + f"\nBuild it as it was saved; a new {', '.join(ACCEPTABLE)} can be accepted "
                         "with load_state_dict(..., accept=[...]) or the accept_changes option.")


def restore_groups(param_groups: list, saved_groups: list, accept) -> list:
    """Each param group with the saved values but for what it keeps: its parameters and record, how a step runs
    (``EXECUTION``), and the accepted changes."""
    keep = {"params", "sara_group", "sara_shapes", "sara_base"} | set(EXECUTION) | {GROUP_KEY.get(k, k) for k in accept}
    for group, saved in zip(param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k not in keep and not (k == "lr" and "lr" in accept)})
    return param_groups


def copied(states: dict) -> dict:
    return {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()} for i, st in states.items()}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _shown(key: str) -> str:
    return {"sara_base": "base", "sara_shapes": "parameter shapes (in order)", "lr_at_start": "lr"}.get(key, key)


def _value(key: str, value) -> str:
    if key == "sara_shapes":
        return "[" + ", ".join("x".join(map(str, s)) for s in value) + "]"
    return repr(value)


def check_states(states: dict, matrices: list, groups: list, base, source: str = "the loaded state") -> None:
    """Each matrix's state: the keys its base makes for it (another base's state is refused by name), a basis where
    it is projected, and finite tensors."""
    for index, st in states.items():
        name = matrices[index].name
        if "projector" in st:
            raise ValueError(
                f"sara_ds: {source} holds galore-torch state (a GaLoreProjector for {name}): convert it with "
                "sara_ds.checkpoints.from_galore_torch(state_dict) and load the result into an optimizer built "
                "with preset='galore'")
        if "step" in st:
            _check_keys(st, matrices[index], groups[matrices[index].group], base, source)
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                bad = value.isnan().any() if key in _MAY_BE_INFINITE else ~torch.isfinite(value).all()
                if bool(bad):
                    raise ValueError(f"sara_ds: {source} holds a non-finite {key!r} for {name}: the checkpoint is "
                                     "damaged (or was saved after a step that diverged)")


def _check_keys(st: dict, matrix, group: dict, base, source: str) -> None:
    projected = "rank" in group and len(matrix.shape) >= 2
    if projected and "basis" not in st:
        raise ValueError(f"sara_ds: {source} for {matrix.name} has no 'basis', but the matrix is projected "
                         f"(its state has {sorted(st)})")
    like = torch.empty((2, 2) if projected else matrix.shape, device="meta")
    missing = sorted(set(base.init(like, projected, group)) - set(st))
    if missing:
        made_by = [b for b, keys in BASE_KEYS.items() if b != base.name and keys <= set(st)]
        by = f"; it was made by the {made_by[0]} base" if made_by else ""
        raise ValueError(f"sara_ds: {source} for {matrix.name} lacks {missing}, which this optimizer's {base.name} "
                         f"base keeps (the state has {sorted(st)}){by}")


def not_a_state(obj) -> str:
    """Why ``obj`` cannot be an optimizer state dict."""
    if obj is None:
        return ("sara_ds: there is no optimizer state to load (None). A DeepSpeed checkpoint saved at ZeRO stage 1, 2 "
                "or 3 keeps it in its zero_pp_rank_* files, which a stage-0 engine does not read: load it at the stage "
                "it was saved with, or convert it with `python -m sara_ds.ds_to_universal` and load it with "
                "checkpoint.load_universal=true at stage 1-3")
    return f"sara_ds: an optimizer state dict has 'state' and 'param_groups'; got {type(obj).__name__}"


def refuse_owned_elsewhere(elsewhere: list) -> None:
    """After a load: state of matrices another rank steps was written under another partitioning."""
    if elsewhere:
        raise RuntimeError(
            f"sara_ds: the loaded optimizer state holds matrices {elsewhere[:8]} that this rank does not step. The "
            "checkpoint was written with a different data-parallel size or ZeRO partitioning. sara_ds state is "
            "partitioned by matrix ownership: resume at the same data-parallel size and ZeRO stage, or convert with "
            "`python -m sara_ds.ds_to_universal` and load with checkpoint.load_universal=true.")


def check_row_blocks(state: dict, slots: list, matrices: list) -> None:
    """After a load: each projected matrix's state holds the rows of it this rank steps (ZeRO-3's row blocks), or
    all of them where it steps the whole matrix."""
    for slot in slots:
        st = state.get(slot.index, {})
        if "basis" in st:
            _check_row_block(st.get("row_block"), list(slot.rows) if slot.rows is not None else None,
                             matrices[slot.index].name)


def _check_row_block(saved, stepped, name: str) -> None:
    if saved != stepped:
        def shown(block):
            return "all its rows" if block is None else f"rows {block[0]}..{block[1] - 1} of {block[2]}"
        raise RuntimeError(
            f"sara_ds: the loaded state of {name} holds {shown(saved)}, but this rank steps {shown(stepped)}: the "
            "checkpoint was written with another ZeRO-3 layout (data-parallel size, or zero3_ownership). Resume with "
            "the layout it was saved with, or convert it with `python -m sara_ds.ds_to_universal` and load it with "
            "checkpoint.load_universal=true.")


def load_file(path: str, **kwargs):
    """``torch.load`` of a file sara_ds reads itself, with an error that names the file when it cannot."""
    try:
        return torch.load(path, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, not a torch file, unpicklable
        raise RuntimeError(f"sara_ds: cannot read {path} ({type(exc).__name__}: {exc}); the file is damaged or "
                           "was cut short while being written") from exc


def atomic_save(obj, path: str) -> None:
    """Write to a temporary name, then rename: a crash during the save leaves the previous file as it was."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def from_galore_torch(state_dict: dict) -> dict:
    """A galore-torch ``GaLoreAdamW.state_dict()`` as sara_ds's, for an optimizer built with the same param groups
    and ``preset='galore'`` (``basis_signs='lapack'`` reproduces galore-torch bit for bit; the default aligns signs
    from the next refresh on, keeping the moments' coordinates). Each projector's ``ortho_matrix`` becomes the
    basis: galore-torch's right factor is r x n with moments m x r, sara_ds's canonical basis n x r with moments
    r x m (``projector``); a left one is the same in both."""
    state = {}
    for index, st in state_dict["state"].items():
        st = dict(st)
        projector = st.pop("projector", None)
        if projector is not None:
            ortho, gap, r = projector.ortho_matrix, projector.update_proj_gap, projector.rank
            # left: ortho m x r, moments r x n; right: ortho r x n, moments m x r
            left = ortho.shape[0] != r if ortho.shape[0] != ortho.shape[1] else st["exp_avg"].shape[0] == r
            basis = ortho if left else ortho.T
            moments = {k: (st[k] if left else st[k].T).contiguous() for k in ("exp_avg", "exp_avg_sq")}
            st = dict(st, **moments, basis=basis.contiguous().float(), left=left, rank=basis.shape[1],
                      matrix_id=index, base_step=st["step"], refreshes=-(-st["step"] // gap), overlap=float("nan"))
        state[index] = st
    groups = [dict(g, **({"subspace": "dominant", "residual": None, "moments_on_refresh": "keep", "preset": "galore"}
                         if "rank" in g else {})) for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}
