"""FSDP2 (``fully_shard``, Shard(0) DTensors, gloo on CPU): sara_ds's optimizers step a sharded model as one process
fed the same gradients would, for every preset and base, at 2 and 3 ranks (uneven row splits: hidden 16 and
vocabulary 64 over 3 ranks, and a [1, 16] weight that only rank 0 holds a row of). State is split over the ranks,
and the bytes sent equal the layout's analytic count."""
import math
import re

import pytest
import torch

import sara_ds
from fsdp2_worker import replay
from launch_utils import run_scenarios

pytest.importorskip("torch.distributed.fsdp")

BASE = dict(lr=0.01, rank=4, update_proj_gap=2, scale=0.25, seed=5)  # 7 steps: refreshes at 0, 2, 4, 6
STEPS = 7
SCENARIOS = (
    [dict(name=f"SaraAdamW/{p}", params=dict(BASE, preset=p, **({"osd_lr": 0.01} if p == "osd" else {})))
     for p in sorted(sara_ds.PRESETS)]
    + [dict(name=f"{cls}/{p}", optimizer=cls, params=dict(BASE, preset=p))
       for cls in ("SaraAdafactor", "SaraAdamMini") for p in ("sara", "galore")]
    + [dict(name="SaraAdamW/sara, built before fully_shard", params=dict(BASE, preset="sara"),
            built_before_sharding=True),
       dict(name="SaraAdamW/sara, a [1, 16] weight", params=dict(BASE, preset="sara"), row_weight=True),
       dict(name="SaraAdamW/sara_fira, a NaN in one rank's rows", params=dict(BASE, preset="sara_fira"),
            poison="layers.2.mlp.down_proj.weight", poison_step=3),
       dict(name="torch AdamW (the harness's control)", optimizer="AdamW", params=dict(lr=0.01))])


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b)


def _wire(opt, world):
    """Bytes the FSDP2 layout sends per step, from the shapes: each whole matrix's gradient and weight rows from
    every non-owner to its owner (padded to ceil(m/N) rows), and the new rows back to each non-owner."""
    gather = scatter = 0
    for m in opt.matrices:
        if m.whole:
            rows = math.ceil(m.shape[0] / world)
            piece = rows * math.prod(m.shape[1:]) * m.param.element_size()
            gather, scatter = gather + 2 * (world - 1) * piece, scatter + (world - 1) * piece
    return gather, scatter


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_equals_one_process_fed_the_same_gradients(world):
    results = run_scenarios(world, SCENARIOS, worker="fsdp2_worker.py", timeout=600)
    print(f"\nFSDP2 at {world} ranks, {STEPS} steps, fp32: max |weights - one process fed the same gradients|")
    for sc, res in zip(SCENARIOS, results):
        assert "error" not in res, res.get("error")
        ref, single = replay(sc, res["grads"])
        diff = _max_diff(res["weights"], ref)
        per_rank = [r["state_bytes"] for r in res["per_rank"]]
        print(f"  {sc['name']:<48} {diff:.1e}   state bytes per rank {per_rank}")
        assert diff <= 1e-6, sc["name"]
        if "optimizer" in sc and sc["optimizer"] == "AdamW":
            continue
        assert {r["layout"] for r in res["per_rank"]} == {"FSDP2Layout"}, sc["name"]
        # the state is split, nothing is kept twice, and the largest rank holds its share plus one matrix's
        largest = max(m.state_numel for m in single.matrices) * 4
        assert sum(per_rank) == single.state_bytes(), sc["name"]
        assert max(per_rank) <= single.state_bytes() / world + largest, sc["name"]
        counts = [r["counts"] for r in res["per_rank"]]
        assert sum(c["refreshes"] for c in counts) == single.refresh_counts()["refreshes"], sc["name"]
        skipped = 1 if "poison" in sc else 0
        assert [c["skipped_steps"] for c in counts] == [skipped] * world, sc["name"]
        gather, scatter = _wire(single, world)
        sent = [r["sent"] for r in res["per_rank"]]
        print(f"  {'':<48} bytes per step, all ranks: {gather} gathered to owners, {scatter} sent back "
              f"(one process's state {single.state_bytes()} B)")
        assert sum(s["fsdp_gather"] for s in sent) == STEPS * gather, sc["name"]
        assert sum(s["fsdp_scatter"] for s in sent) == STEPS * scatter, sc["name"]


RESUMED = [dict(name="SaraAdamW/sara", params=dict(BASE, preset="sara")),
           dict(name="SaraAdamW/sara_fira", params=dict(BASE, preset="sara_fira")),
           dict(name="SaraAdamW/osd", params=dict(BASE, preset="osd", osd_lr=0.01)),
           dict(name="SaraAdafactor/sara", optimizer="SaraAdafactor", params=dict(BASE, preset="sara")),
           dict(name="SaraAdamMini/galore", optimizer="SaraAdamMini", params=dict(BASE, preset="galore")),
           dict(name="torch AdamW (the harness's control)", optimizer="AdamW", params=dict(lr=0.01))]
SAVED_AT = 3  # refreshes at 0 and 2 before the save, 4 and 6 after


@pytest.mark.parametrize("before,after", [(2, 3), (3, 2), (2, 1)], ids=["2to3", "3to2", "2to1"])
def test_dcp_checkpoints_resume_at_another_world_size_as_one_process(tmp_path, before, after):
    """get_state_dict + dcp.save at one world size, get_state_dict (the template) + dcp.load + set_state_dict at
    another: the run goes on as one process fed the same gradients, across a refresh, with every matrix's state
    (whole matrices change owners between the two sizes; nothing is kept as one rank's copy)."""
    saves = [dict(sc, steps=SAVED_AT, save_to=str(tmp_path / f"ckpt{i}")) for i, sc in enumerate(RESUMED)]
    first = run_scenarios(before, saves, worker="fsdp2_worker.py", timeout=600)
    resumes = [dict(sc, start=SAVED_AT, steps=STEPS, load_from=str(tmp_path / f"ckpt{i}")) for i, sc in enumerate(RESUMED)]
    second = run_scenarios(after, resumes, worker="fsdp2_worker.py", timeout=600)
    print(f"\nFSDP2 + DCP, saved at {before} ranks after {SAVED_AT} steps, resumed at {after} for {STEPS - SAVED_AT}: "
          "max |weights - one process fed the same gradients|")
    for sc, a, b in zip(RESUMED, first, second):
        assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
        ref, single = replay(sc, a["grads"] + b["grads"])
        diff = _max_diff(b["weights"], ref)
        print(f"  {sc['name']:<40} {diff:.1e}")
        assert diff <= 1e-6, sc["name"]
        if sc.get("optimizer") == "AdamW":
            continue
        assert sum(r["counts"]["refreshes"] for r in b["per_rank"]) == single.refresh_counts()["refreshes"]
        if after > 1:
            moved = [i for i in a["owners"] if a["owners"][i] != b["owners"][i]]
            assert moved, "some whole matrix must change owner between the two sizes"


def test_placements_other_than_rows_are_refused_at_the_first_step_by_name():
    scenarios = [dict(name="columns", params=dict(BASE, preset="sara"), shard_columns=True, expect_error=True)]
    res = run_scenarios(2, scenarios, worker="fsdp2_worker.py", timeout=300)[0]
    assert "is placed (Shard(dim=1),) on mesh" in res["error"] and "Shard(0)" in res["error"], res["error"]


def test_dcp_template_step_of_an_empty_optimizer_counts_as_no_step_and_no_refresh():
    scenarios = [dict(name="template", params=dict(BASE, preset="sara"), template_only=True),
                 dict(name="template adafactor", optimizer="SaraAdafactor", params=dict(BASE, preset="sara"),
                      template_only=True)]
    for res in run_scenarios(2, scenarios, worker="fsdp2_worker.py", timeout=300):
        assert res["counts"] == {"refreshes": 0, "skipped_steps": 0} and res["steps"] == [0], res
        assert len(res["keys"]) == 48, res["keys"]  # every parameter has state to load into, on every rank


def _train_fsdp2(ranks, cwd, *args):
    import os
    import subprocess
    import sys

    from launch_utils import ROOT, base_env, free_port

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
           os.path.join(ROOT, "examples", "train_fsdp2.py"), "--hidden", "64", "--layers", "2", "--seq_len", "32",
           "--rank", "8", "--update_proj_gap", "5", "--eval_interval", "10", "--eval_batches", "1", "--no_progress",
           *args]
    run = subprocess.run(cmd, cwd=cwd, env=base_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    import re

    summary = dict(checksum=float(re.search(r"weights checksum (\S+)", run.stdout).group(1)),
                   refreshes=int(re.search(r"subspace refreshes (\d+)", run.stdout).group(1)),
                   start=int(re.search(r"steps=(\d+)->", run.stdout).group(1)))
    return summary, run.stdout


def test_the_fsdp2_example_trains_and_resumes_through_dcp_at_the_same_and_another_size(tmp_path):
    """examples/train_fsdp2.py under torchrun: 20 steps straight at 2 ranks; 10, then a resume from the DCP
    checkpoint at 2 ranks (the same weights, bit for bit) and at 3 (the same up to the reduction's round-off)."""
    straight, out = _train_fsdp2(2, tmp_path, "--steps", "20")
    ppl = [float(p) for p in re.findall(r"val_ppl ([0-9.]+)", out)]
    assert ppl[-1] < ppl[0] < 4096  # it learns
    _train_fsdp2(2, tmp_path, "--steps", "10", "--save_dir", "ckpt")
    same, _ = _train_fsdp2(2, tmp_path, "--steps", "20", "--save_dir", "ckpt", "--resume")
    assert same["start"] == 10 and same["checksum"] == straight["checksum"]
    assert same["refreshes"] == straight["refreshes"]
    (tmp_path / "ckpt" / "latest").write_text("step10")
    resumed, _ = _train_fsdp2(3, tmp_path, "--steps", "20", "--save_dir", "ckpt", "--resume")
    print(f"\nchecksums: straight {straight['checksum']:.10e}, resumed at 2 {same['checksum']:.10e}, "
          f"at 3 {resumed['checksum']:.10e}")
    # the plumbing: it resumed at step 10 with every matrix's state (the refreshes go on from the saved count);
    # bit-exactness across sizes is test_dcp_checkpoints_resume_at_another_world_size_as_one_process's
    assert resumed["start"] == 10 and resumed["refreshes"] == straight["refreshes"]
