"""Resuming a ZeRO-1/2/3 run at another data-parallel size through DeepSpeed's universal checkpoint
(``python -m sara_ds.ds_to_universal``, then ``"checkpoint": {"load_universal": true}``).

6 steps at DP=A, save, convert, 6 steps at DP=B, for 2->3, 3->2 and 2->1 at stages 1, 2 and 3, against one process.
At stages 1 and 2 that process is fed the gradient each step's DP size forms, with per-rank gradients on a
fixed-point grid (test_deepspeed explains why); at stage 3 it is fed the gradients the two runs recorded
(``ds_worker.replayed_weights``: ZeRO-3's hooks change autograd's summation order). Either way the comparison
measures the checkpoint's round trip and nothing else. The ZeRO-2 cases take one rule of each kind of state
(Fira's norm on top of the plain keys, OSD's basis moments, a random draw), every other rule's state being made of
these keys; the ZeRO-1 and ZeRO-3 cases take Fira's, and OSD's at 2 -> 3. (All 8 rules in every stage-1/2 case were
bit-identical too, in runs while this was written, and `sara` and OSD in every stage-3 case.) At stage 3 torch's
AdamW through the same converter is the control. The
same launches check that no state is ever dropped: DeepSpeed's own converter, inconsistent files, a universal
folder without sara_ds's state and an engine that would step before loading one all fail loudly.
"""
import os
import shutil

import pytest
import torch

pytest.importorskip("deepspeed")

from ds_worker import reference_weights, replayed_weights  # noqa: E402
from launch_utils import run_scenarios  # noqa: E402
from sara_ds.integrations import deepspeed_universal  # noqa: E402

BEFORE, AFTER, GAP = 6, 6, 3  # refreshes at 0, 3 (before), 6 (the first step after the resume), 9
KINDS = ("sara_fira", "osd", "golore")
CASES = [(2, 3, 2, KINDS), (3, 2, 2, KINDS), (2, 1, 2, KINDS), (2, 1, 1, ("sara_fira",)),
         (2, 3, 3, ("sara_fira", "osd", "AdamW")), (3, 2, 3, ("sara_fira",)), (2, 1, 3, ("sara_fira",))]
# (DP before, DP after, ZeRO stage, rules; "AdamW": torch's, through DeepSpeed's own converter). ZeRO-1 loads
# through the same code as ZeRO-2 (stage_1_and_2.py): one case.
UNIVERSAL = {"checkpoint": {"load_universal": True}}


def _params(preset):
    if preset == "AdamW":
        return dict(lr=0.01, eps=1e-6, weight_decay=0.0, torch_adam=True)
    return dict(lr=0.01, rank=4, update_proj_gap=GAP, scale=0.25, seed=5, preset=preset,
                **({"osd_lr": 0.01} if preset == "osd" else {}))


def _zero(stage):
    if stage == 3:  # several sub-groups, every parameter partitioned
        return {"stage": 3, "sub_group_size": 1500, "stage3_param_persistence_threshold": 0}
    return {"stage": stage, "reduce_scatter": False}  # scale after summing, as the grid oracle does


def _run(stage, preset):
    """How a scenario trains: the grid at stages 1/2, recorded gradients at stage 3."""
    return dict(optimizer="AdamW" if preset == "AdamW" else "SaraAdamW", **(
        {"record_grads": True} if stage == 3 else {"grid_grads": True}))


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _saved(root, world, stage, preset):
    return os.path.join(root, f"w{world}-z{stage}-{preset}")


def _saves(world, root):
    """The checkpoints the cases need from ``world`` ranks, after BEFORE steps."""
    wanted = sorted({(stage, preset) for a, _, stage, presets in CASES if a == world for preset in presets})
    return [dict(name=f"save-{preset}-z{stage}", params=_params(preset), zero=_zero(stage), **_run(stage, preset),
                 steps=BEFORE, save_to=_saved(root, world, stage, preset), saves=(world, stage, preset))
            for stage, preset in wanted]


def _resumes(target, root):
    return [dict(name=f"resume-{a}-{preset}-z{stage}", params=_params(preset), zero=_zero(stage), **_run(stage, preset),
                 load_from=_saved(root, a, stage, preset) + "-universal", resume_step=BEFORE, steps=BEFORE + AFTER,
                 extra_config=UNIVERSAL, source_world=a, stage=stage, preset=preset)
            for a, b, stage, presets in CASES if b == target for preset in presets]


def _convert_all(world, root):
    for a, _, stage, presets in CASES:
        for preset in presets if a == world else ():
            out = os.path.join(_saved(root, a, stage, preset) + "-universal", "universal")
            if not os.path.isdir(out):  # DeepSpeed also writes latest_universal beside it
                deepspeed_universal.convert(os.path.join(_saved(root, a, stage, preset), "final"), out)


def test_resume_at_another_data_parallel_size_matches_one_process_and_never_drops_state(tmp_path):
    root = str(tmp_path)
    # stage 0 needs no conversion: every rank holds the whole state, and the regular checkpoint loads at any size
    stage0 = dict(name="resume-2-sara-z0", params=_params("sara"), zero={"stage": 0}, grid_grads=True,
                  resume_step=BEFORE, steps=BEFORE + AFTER, source_world=2, stage=0, preset="sara",
                  load_from=_saved(root, 2, 0, "sara"), load_tag="final")
    saves = _saves(2, root)
    saved = run_scenarios(2, saves + [dict(name="save-sara-z0", params=_params("sara"), zero={"stage": 0},
                                           grid_grads=True, steps=BEFORE, save_to=_saved(root, 2, 0, "sara"))])
    assert all("error" not in r for r in saved), [r.get("error") for r in saved]
    before = {sc["saves"]: res for sc, res in zip(saves, saved)}  # the runs up to the save, by (DP, stage, rule)
    _convert_all(2, root)
    # the regular (not universal) checkpoints at another size: DeepSpeed refuses them itself at 2 -> 1, and at
    # the same size with other ownership (each rank handed the other's file, as a checkpoint written under another
    # partitioning would give it) DeepSpeed accepts, so sara_ds's own check must refuse
    regular = dict(name="regular-2-to-1", params=_params("sara_fira"), zero=_zero(2), load_from=_saved(root, 2, 2, "sara_fira"),
                   load_tag="final", resume_step=BEFORE, expect_error=True)
    swapped = os.path.join(root, "swapped")
    shutil.copytree(_saved(root, 2, 2, "sara_fira"), swapped)
    name = os.path.join(swapped, "final", "zero_pp_rank_{}_mp_rank_00_optim_states.pt")
    os.rename(name.format(0), name.format("tmp"))
    os.rename(name.format(1), name.format(0))
    os.rename(name.format("tmp"), name.format(1))
    swap = dict(regular, name="swapped", load_from=swapped)
    # an engine built otherwise than the one that saved: every stage refuses, listing the difference
    changed = [dict(name=f"changed-z{stage}-{'-'.join(change)}", params=dict(_params(preset), **change), zero=_zero(stage),
                    load_from=_saved(root, 2, stage, preset), load_tag="final", resume_step=BEFORE, expect_error=True,
                    expected=expected)
               for stage, preset, change, expected in (
                   (0, "sara", dict(rank=3), "rank saved 4, now 3"),
                   (1, "sara_fira", dict(preset="sara"), "residual saved 'fira', now None"),
                   (2, "sara_fira", dict(update_proj_gap=50), "update_proj_gap saved 3, now 50"),
                   (3, "sara_fira", dict(rank=5), "rank saved 4, now 5"),
                   # row blocks saved, whole matrices asked for: refused at the first step, by matrix and rows
                   (3, "sara_fira", dict(zero3_ownership="whole"), "was written with another ZeRO-3 layout"))]
    # a file cut short (a save a lost node left half-written): named before DeepSpeed reads anything
    damaged = os.path.join(root, "damaged")
    shutil.copytree(_saved(root, 2, 2, "sara_fira"), damaged)
    shard = os.path.join(damaged, "final", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    changed.append(dict(regular, name="truncated", load_from=damaged, expected=f"{shard} is damaged"))
    # a ZeRO-2 checkpoint at ZeRO-0: the optimizer state is in files stage 0 does not read
    changed.append(dict(name="z2-into-z0", params=_params("sara_fira"), zero={"stage": 0},
                        load_from=_saved(root, 2, 2, "sara_fira"), load_tag="final", resume_step=BEFORE,
                        expect_error=True, expected="there is no optimizer state to load (None)"))
    refusals, refused_with = _never_dropped(root, os.path.join(_saved(root, 2, 2, "sara_fira"), "final"))
    results = {3: run_scenarios(3, _resumes(3, root) + _saves(3, root))}
    before.update({sc["saves"]: res for sc, res in zip(_saves(3, root), results[3][len(_resumes(3, root)):])})
    _convert_all(3, root)
    results[2] = run_scenarios(2, _resumes(2, root) + [swap] + changed)
    results[1] = run_scenarios(1, _resumes(1, root) + [stage0, regular] + refusals)
    print(f"\nsave after {BEFORE} steps at DP=A, ds_to_universal, {AFTER} more steps at DP=B (fp32, refreshes every "
          f"{GAP} steps): max |resumed - one process|")
    worst, control = 0.0, None
    for target, extra in ((3, []), (2, []), (1, [stage0])):
        for res, sc in zip(results[target], _resumes(target, root) + extra):
            assert "error" not in res, (sc["name"], res.get("error"))
            a = sc["source_world"]
            if sc["stage"] == 3:
                first = before[(a, 3, sc["preset"])]
                ref, _ = replayed_weights(sc["optimizer"], sc["params"], first["grads"] + res["grads"])
            else:
                ref, _ = reference_weights("SaraAdamW", sc["params"], steps=BEFORE + AFTER, grid_grads=True,
                                           world=[a] * BEFORE + [target] * AFTER)
            diff = _max_diff(res["weights"], ref)
            print(f"  {a}->{target} ZeRO-{sc['stage']} {sc['preset']:<10} {diff:.2e}"
                  + ("  (torch's AdamW, the control)" if sc["preset"] == "AdamW" else ""))
            if sc["preset"] == "AdamW":
                control = diff
                continue
            worst = max(worst, diff)
            assert diff < 1e-5, (sc["name"], diff)
            # the resumed state is partitioned at the new size: every projected matrix is held, and each refreshed
            # at 0, 3, 6, 9 (OSD once, then its basis moves every step), counted across the save
            held = {}
            for r in res["ranks"]:
                for i, n in r["refreshes"].items():
                    held.setdefault(i, set()).add(n)
            assert held and all(n == {1 if sc["preset"] == "osd" else 4} for n in held.values()), (sc["name"], held)
    assert control is not None and worst <= control  # at stage 3 DeepSpeed asks no better than its own AdamW
    print(f"  worst {worst:.2e}")
    refused = {"regular-2-to-1": results[1][-1 - len(refusals)], "swapped": results[2][-1 - len(changed)]}
    for sc, res in zip(changed, results[2][-len(changed):]):
        print(f"  {sc['name']}: {res.get('error', 'NO ERROR')[:200]}")
        assert sc["expected"] in res.get("error", ""), (sc["name"], res)
    for label, res in refused.items():
        print(f"  {label}: {res.get('error', 'NO ERROR')[:300]}")
    for res in results[1][-len(refusals):]:
        print(f"  {res['name']}: {res.get('error', 'NO ERROR')[:200]}")
        assert refused_with[res["name"]] in res.get("error", ""), res
    assert "used a DP world size of 2 but the current world size is 1" in refused["regular-2-to-1"].get("error", "")
    assert "that this rank does not step" in refused["swapped"].get("error", "") \
        and "same data-parallel size" in refused["swapped"]["error"]


def _never_dropped(root, tag):
    """DeepSpeed's own conversion dies on sara_ds state, and a straddler whose pieces or copies disagree fails the
    conversion (checked here, on the files of the 2-rank checkpoint ``tag``). Returns the 1-rank scenarios that
    must be refused, and what their errors must say: a universal folder without sara_ds's state, an engine that
    would step before loading one, ``load_universal`` at stage 0."""
    from deepspeed.checkpoint import ds_to_universal as d2u
    import argparse

    args = argparse.Namespace(input_folder=tag, output_folder=os.path.join(root, "ds_own"), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with pytest.raises((KeyError, IndexError)):  # it reads a flat partition's state as exp_avg / by group index
        d2u.main(args)
    # a straddler's state made inconsistent: a full-rank AdamW one (stepped piece by piece, each rank keeps its
    # piece's moments: the pieces must agree on their step count), and a projected one (stepped by one rank since
    # this version; an older one kept a copy per holder, and such copies must be equal)
    states = [torch.load(os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), weights_only=False)
              for r in range(2)]
    held = [s["optimizer_state_dict"]["base_optimizer_state"]["state"] for s in states]  # {matrix id: state}
    pieces = sorted(set(held[0]) & set(held[1]))  # full-rank straddlers, stepped piece by piece
    ids, _ = deepspeed_universal.matrices_of(torch.load(os.path.join(tag, "mp_rank_00_model_states.pt"),
                                                         weights_only=False))
    on_rank1 = {ids[name] for mapping in states[1]["optimizer_state_dict"]["param_slice_mappings"] for name in mapping}
    projected = [i for i, st in held[0].items() if "basis" in st and i in on_rank1]
    assert pieces and projected, "the test model should have a full-rank and a projected straddler at 2 ranks"
    assert not any(i in held[1] for i in projected), "a projected matrix has 2 steppers"
    for kind in ("pieces", "projected"):
        bad = os.path.join(root, f"bad-{kind}")
        os.makedirs(bad)
        for name in os.listdir(tag):
            if not name.startswith("zero_pp_rank_1_"):
                os.symlink(os.path.join(tag, name), os.path.join(bad, name))
        changed = torch.load(os.path.join(tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt"), weights_only=False)
        state = changed["optimizer_state_dict"]["base_optimizer_state"]["state"]
        if kind == "pieces":
            index = pieces[0]
            state[index]["step"] += 1
            expected = f"the pieces of .* \\(matrix {index}\\) disagree on 'step'"
        else:
            index = projected[0]
            state[index] = dict(held[0][index], step=held[0][index]["step"] + 1)
            expected = f"matrix {index} .* straddles ZeRO partitions and its copies on DP ranks \\[0, 1\\] differ"
        torch.save(changed, os.path.join(bad, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
        with pytest.raises(RuntimeError, match=expected):
            deepspeed_universal.convert(bad, os.path.join(root, f"bad-{kind}-out"))
    _killed_conversion_keeps_the_previous_one(root, tag)
    # DeepSpeed's output for a plain universal folder (the sidecar removed) and an engine that never loads
    deepspeed_universal.convert(tag, os.path.join(root, "u", "universal"))
    os.remove(os.path.join(root, "u", "universal", deepspeed_universal.SIDECAR))
    scenarios = [
        dict(name="no-sidecar", params=_params("sara_fira"), zero=_zero(2), load_from=os.path.join(root, "u"),
             resume_step=BEFORE, extra_config=UNIVERSAL, expect_error=True),
        dict(name="never-loaded", params=_params("sara"), zero=_zero(2), steps=1, extra_config=UNIVERSAL,
             expect_error=True),
        dict(name="stage-0", params=_params("sara"), zero={"stage": 0}, steps=1, extra_config=UNIVERSAL,
             expect_error=True),
    ]
    expected = {"no-sidecar": "optimizer_state.pt is missing", "never-loaded": "no universal checkpoint has been loaded",
                "stage-0": "load_universal=true is supported at zero_optimization.stage 1, 2 and 3"}
    return scenarios, expected


def _killed_conversion_keeps_the_previous_one(root, tag):
    """A conversion killed part-way (os._exit after its 5th file) leaves every file it had written whole, the one it
    was writing under a temporary name, and ``latest_universal`` naming the previous conversion, which loads."""
    import subprocess
    import sys

    from launch_utils import base_env

    first = os.path.join(root, "kill", "first")
    deepspeed_universal.convert(tag, first)
    script = (f"import os, sys; from sara_ds import checkpoints; from sara_ds.integrations import deepspeed_universal; "
              f"real, calls = checkpoints.atomic_save, []\n"
              f"def dying(obj, path):\n    calls.append(path)\n    if len(calls) == 5:\n"
              f"        import torch; torch.save(obj, path + '.tmp.partial'); os._exit(9)\n    real(obj, path)\n"
              f"checkpoints.atomic_save = dying\n"
              f"deepspeed_universal.convert({tag!r}, {os.path.join(root, 'kill', 'second')!r})")
    proc = subprocess.run([sys.executable, "-c", script], env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stdout + proc.stderr
    with open(os.path.join(root, "kill", "latest_universal")) as f:
        assert f.read() == "first"
    written = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, "kill", "second")) for f in files]
    assert len([p for p in written if p.endswith(".pt")]) == 4 and any(".tmp" in p for p in written), written
    for path in (p for p in written if p.endswith(".pt")):
        torch.load(path, weights_only=False)  # every file under its final name is whole
    assert deepspeed_universal.collect_state(tag) is not None and os.path.isfile(
        os.path.join(first, deepspeed_universal.SIDECAR))


def test_row_blocks_join_into_one_process_state_or_the_conversion_names_what_is_wrong():
    """ZeRO-3 row blocks in a checkpoint: the split statistics (R's columns) are joined in row order, the shared
    tensors must agree bit for bit, and the blocks must tile the rows; a cut of the joined state gives each block
    back (what a resume at another size hands each rank)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 2, generator=g)
    whole = dict(basis=basis, exp_avg=torch.randn(2, 10, generator=g), exp_avg_sq=torch.rand(2, 10, generator=g),
                 step=4, left=False, rank=2)
    cuts = [(0, 4, 10), (4, 7, 10), (7, 10, 10)]
    blocks = [(deepspeed_universal.row_block_state(whole, cut), 0, rank) for rank, cut in enumerate(cuts)]
    assert [st["exp_avg"].shape[-1] for st, _, _ in blocks] == [4, 3, 3]
    merged = deepspeed_universal.merge_zero3(7, "w", (10, 6), blocks[::-1])  # any file order
    assert "row_block" not in merged and all(torch.equal(merged[k], whole[k]) for k in ("basis", "exp_avg", "exp_avg_sq"))
    with pytest.raises(RuntimeError, match=r"do not tile its 10 rows"):
        deepspeed_universal.merge_zero3(7, "w", (10, 6), [blocks[0], blocks[2]])
    with pytest.raises(RuntimeError, match=r"cover rows 0\.\.6 of 10"):
        deepspeed_universal.merge_zero3(7, "w", (10, 6), blocks[:2])
    other = dict(blocks[1][0], basis=basis + 1e-7)
    with pytest.raises(RuntimeError, match=r"disagree on 'basis'"):
        deepspeed_universal.merge_zero3(7, "w", (10, 6), [blocks[0], (other, 0, 1), blocks[2]])
    with pytest.raises(RuntimeError, match=r"row-block state on some DP ranks and whole-matrix state on others"):
        deepspeed_universal.merge_zero3(7, "w", (10, 6), [blocks[0], (whole, 0, 1)])
