"""The evidence benchmark harness (sara_bench, harness/): a smoke run of every method, the report, and exact resume."""
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from sara_bench import bench, corpus, records, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONPATH = os.pathsep.join([ROOT, os.path.join(ROOT, "harness")])
LAYER_TYPES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
DOMINANT = ("GaLore", "Fira", "GaLore-Adafactor", "GaLore-Adam-mini")  # the frozen-subspace rule (top-r SVD)
RANDOM = ("GoLore", "GrassJump")  # a fresh Haar-random basis at every refresh
SLOW = ("OSD", "GrassWalk")  # one small step of the basis per refresh


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=PYTHONPATH)
    return subprocess.run([sys.executable, "-m", "sara_bench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _records(folder):
    return records.load_results(os.path.join(folder, "results.jsonl"))


def _untrained_ppl(size, seed=0):
    """Validation perplexity of the model every method starts from (same seed, same validation batches)."""
    model, *_ = bench.build(bench.RunSpec("AdamW", size.adamw_lrs[0], seed), size, "cpu")
    total = count = 0
    with torch.no_grad():
        for x, y in corpus.validation_batches(size.seq_len, size.batch, size.eval_batches):
            total += model(x, y).item() * y.numel()
            count += y.numel()
    return math.exp(total / count)


def _mean_overlap(rec):
    return statistics.mean(v for _, by_type in rec["overlap"] for v in by_type.values())


@pytest.mark.timeout(600)
def test_smoke_run_covers_every_method_and_writes_the_report(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    proc = _cli("--size", "smoke", "--out", str(out), "--docs", str(docs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = _records(out)
    assert sorted(r["method"] for r in found.values()) == sorted(m.name for m in bench.METHODS)
    size = bench.SIZES["smoke"]
    # Every method must really train: the untrained model sits near 4096 (uniform over the vocabulary), and 24 steps
    # bring every method to 0.45-0.55 of it (measured); an optimizer that never moves the weights stays at 1.0.
    untrained = _untrained_ppl(size)
    assert 3000 < untrained < 6000, untrained
    for rec in found.values():
        assert rec["nonfinite_steps"] == 0 and rec["val_ppl"] < 0.75 * untrained, (rec["run_id"], rec["val_ppl"], untrained)
        assert [s for s, _ in rec["val"]] == [8, 16, 24]
        if rec["method"].startswith("AdamW"):
            assert rec["overlap"] == [] and "state_bytes" not in rec
        else:
            # one overlap record per refresh after the first (refreshes at 0, T, 2T, ...), each for every layer type
            assert len(rec["overlap"]) == (size.steps - 1) // size.update_proj_gap, rec["run_id"]
            assert all(set(by_type) == LAYER_TYPES for _, by_type in rec["overlap"]), rec["run_id"]
        ranks = rec["effective_rank"][-1][1]
        assert all(1.0 <= v <= 32 for v in ranks.values())
    # What each rule does to consecutive bases, against the floor r/n of two independent random r-subspaces
    # (r = 8 of n = 32 here). Measured (mean over refreshes and layer types): dominant 0.35-0.36, importance
    # 0.32, random 0.249, OSD/GrassWalk 0.89-0.91. A rule that stopped refreshing, or drew the wrong directions,
    # or an overlap that was not measured on the real bases, fails one of these.
    floor = size.rank / size.hidden
    overlap = {rec["method"]: _mean_overlap(rec) for rec in found.values() if rec["overlap"]}
    print("\nmean overlap of consecutive bases:", {k: round(v, 3) for k, v in sorted(overlap.items())})
    for name in RANDOM:
        assert abs(overlap[name] - floor) < 0.03, (name, overlap[name])
    for name in DOMINANT:
        assert overlap[name] > floor + 0.07, (name, overlap[name])
    for name in SLOW:
        assert overlap[name] > 0.7, (name, overlap[name])
    for base, sara in records.CLOSURE_PAIRS:  # importance sampling moves the subspace more than its dominant base
        assert floor + 0.03 < overlap[sara] < overlap[base] - 0.02, (base, sara, overlap[sara], overlap[base])
    md = (docs / "results.md").read_text()
    for m in bench.METHODS:
        assert f"| {m.name} |" in md
    assert "## Gap closure" in md and "| GaLore | SARA-GaLore |" in md
    assert "sara-bench --size smoke" in md  # the command that produced it
    for png in ("val_curves.png", "overlap.png", "effective_rank.png"):
        assert (docs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (docs / "results.jsonl").read_text() == (out / "results.jsonl").read_text()
    assert "[bench] finished" in proc.stdout and "| ETA " in proc.stdout  # progress lines while it runs
    # a second invocation has nothing to do: every run is already in results.jsonl
    again = _cli("--size", "smoke", "--out", str(out))
    n = len(bench.METHODS)
    assert again.returncode == 0 and f"{n} of {n} runs already" in again.stdout and "[bench] finished" not in again.stdout


@pytest.mark.timeout(600)
def test_an_interrupted_benchmark_resumes_bit_for_bit(tmp_path):
    methods = "SARA-Fira,OSD"
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert _cli("--size", "smoke", "--methods", methods, "--out", str(straight)).returncode == 0
    stopped = _cli("--size", "smoke", "--methods", methods, "--out", str(broken), "--stop-after", "12")
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "resume from their checkpoints" in stopped.stdout
    assert not (broken / "results.jsonl").exists() or _records(broken) == {}
    ckpts = sorted(os.listdir(broken / "checkpoints"))
    assert ckpts, "the interrupted runs left no checkpoint"
    # checkpoints are plain tensors and numbers
    torch.load(broken / "checkpoints" / ckpts[0], weights_only=True)
    resumed = _cli("--size", "smoke", "--methods", methods, "--out", str(broken))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = _records(straight), _records(broken)
    assert sorted(a) == sorted(b)
    for run_id in a:
        for key in ("val", "overlap", "effective_rank", "train_loss"):
            assert a[run_id][key] == b[run_id][key], (run_id, key)
    assert os.listdir(broken / "checkpoints") == []


def test_a_folder_of_another_configuration_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"size": "cpu", "fingerprint": "0123456789ab"}))
    with pytest.raises(ValueError, match="different configuration"):
        bench.run_benchmark("smoke", str(out), methods=["AdamW"])
    with pytest.raises(ValueError, match="method='Adam'"):
        bench.run_benchmark("smoke", str(tmp_path / "x"), methods=["Adam"])
    with pytest.raises(ValueError, match="size='huge'"):
        bench.run_benchmark("huge", str(tmp_path / "y"))


def test_effective_rank_spans_one_to_full():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(40, 1, generator=g), torch.randn(1, 30, generator=g)
    assert bench.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-4)  # fp32 product: tiny noise sigmas
    assert bench.effective_rank(torch.eye(30)) == pytest.approx(30.0, rel=1e-9)
    assert 1.0 < bench.effective_rank(torch.randn(40, 30, generator=g)) < 30.0


def test_gap_closure_is_computed_against_the_best_adamw_lr():
    def rec(method, lr, seed, ppl):
        import math
        return dict(run_id=f"{method}{lr}{seed}", method=method, lr=lr, seed=seed, val_loss=math.log(ppl), val_ppl=ppl,
                    val=[[1, math.log(ppl)]], overlap=[], effective_rank=[], seconds=1.0)

    results = {}
    for seed, noise in enumerate((-0.5, 0.0, 0.5)):
        for r in (rec("AdamW", 1e-3, seed, 120 + noise), rec("AdamW", 3e-3, seed, 100 + noise),
                  rec("GaLore", 1e-2, seed, 110 + noise), rec("SARA-GaLore", 1e-2, seed, 105 + noise)):
            results[r["run_id"]] = r
    summary = report.summarize(results)
    assert summary["AdamW"]["lr"] == 3e-3 and summary["AdamW"]["ppl"] == pytest.approx(100.0)
    (row,) = report.closures(summary)
    assert row["closure"] == pytest.approx(0.5) and row["reference"] == "AdamW"
    assert row["per_seed"][0] == pytest.approx(0.5, abs=0.03)
    # a better full-rank control (the split-lr AdamW) becomes the reference the gap is measured to
    for seed in range(3):
        r = rec("AdamW-split", 1e-2, seed, 98)
        results[r["run_id"]] = r
    (row,) = report.closures(report.summarize(results))
    assert row["reference"] == "AdamW-split" and row["closure"] == pytest.approx(5 / 12)


def test_the_plan_tunes_adamw_and_runs_every_method_per_seed():
    size = bench.SIZES["cpu"]
    runs = bench.plan(size)
    assert len(runs) == (len(bench.METHODS) - 1 + len(size.adamw_lrs)) * len(size.seeds)  # AdamW over its grid
    assert len({r.run_id for r in runs}) == len(runs)
    assert size.rank == size.hidden // 4 and size.update_proj_gap == size.steps // 40
    lam = bench.lr_lambda(size)
    warm = size.steps // 10
    assert lam(warm - 1) == pytest.approx(1.0) and lam(size.steps) == pytest.approx(0.1)
    assert bench.SIZES["gpu60m"].hidden == 512 and bench.SIZES["gpu60m"].ffn == 1376


def test_the_gpu_size_builds_llama_60m_shapes_and_steps():
    size = dataclasses.replace(bench.SIZES["gpu60m"], data="prose")  # its code corpus: tests/test_code_corpus.py
    model, opt, sched, projected = bench.build(bench.RunSpec("SARA-GaLore", size.lowrank_lr, 0), size, "cpu")
    shapes = {bench.layer_type(n): tuple(p.shape) for n, p in projected.items()}
    assert shapes == {"q_proj": (512, 512), "k_proj": (512, 512), "v_proj": (512, 512), "o_proj": (512, 512),
                      "gate_proj": (1376, 512), "up_proj": (1376, 512), "down_proj": (512, 1376)}
    assert len(projected) == 7 * 8 and size.rank == 128 and size.update_proj_gap == 62
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt.step()
    sched.step()
    assert sum(st["refreshes"] for _, st in opt.matrix_states()) == 56
    assert all(st["basis"].shape == (512, 128) for _, st in opt.matrix_states())


@pytest.mark.timeout(300)
def test_sigterm_stops_every_run_and_the_rerun_finishes(tmp_path):
    """SLURM preemption and time limits send SIGTERM: workers must go too, and a rerun must resume."""
    import signal
    import time

    import psutil

    out = tmp_path / "out"
    args = [sys.executable, "-m", "sara_bench", "--size", "smoke", "--steps", "600", "--methods",
            "SARA-GaLore,Fira", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=PYTHONPATH)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    def checkpoints():  # a worker killed mid-save may leave its *.pt.tmp; only renamed *.pt files are checkpoints
        folder = out / "checkpoints"
        return [n for n in os.listdir(folder) if n.endswith(".pt")] if folder.exists() else []

    while not checkpoints():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted (signal 15)" in stdout, stdout[-2000:]
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"workers outlived the benchmark: {alive}"
    saved = {name: torch.load(out / "checkpoints" / name, weights_only=True)["step"] for name in checkpoints()}
    assert saved and all(0 < step < 600 for step in saved.values())
    rerun = _cli("--size", "smoke", "--steps", "600", "--methods", "SARA-GaLore,Fira", "--out", str(out))
    assert rerun.returncode == 0, rerun.stdout[-2000:]
    assert sorted(_records(out)) == ["Fira_lr0.01_s0", "SARA-GaLore_lr0.01_s0"]


def test_the_console_script_and_python_m_run_the_benchmark():
    exe = os.path.join(os.path.dirname(sys.executable), "sara-bench")
    if not os.path.exists(exe):
        pytest.skip("the sara-bench console script is not installed (pip install -e harness)")
    for cmd in ([exe, "--help"], [sys.executable, "-m", "sara_bench", "--help"]):
        run = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=PYTHONPATH), capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0 and "usage: sara-bench" in run.stdout and "--size" in run.stdout, run.stderr


def test_the_report_reads_results_without_importing_the_benchmark():
    code = "import sys, sara_bench.report; assert 'sara_bench.bench' not in sys.modules, sorted(sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=PYTHONPATH),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_the_t_distribution_and_the_paired_tests():
    for t in (0.3, 1.0, 2.92, 9.9):  # closed forms at 1 and 2 degrees of freedom
        assert abs(report.t_sf(t, 1) - (0.5 - math.atan(t) / math.pi)) < 1e-12
        assert abs(report.t_sf(t, 2) - (0.5 - t / (2 * math.sqrt(2 + t * t)))) < 1e-12
        assert abs(report.t_sf(-t, 3) - (1 - report.t_sf(t, 3))) < 1e-12
    assert abs(report.t_sf(2.015, 5) - 0.05) < 1e-4 and abs(report.t_sf(2.228, 10) - 0.025) < 1e-4  # tables
    better = report.paired_test([0.020, 0.018, 0.025])
    assert better["positive"] == 3 and better["sign_p_one"] == 0.125  # 3 of 3 cannot beat 1/8
    assert abs(better["t"] - 0.021 / (statistics.stdev([0.020, 0.018, 0.025]) / math.sqrt(3))) < 1e-9
    assert 0 < better["p_one"] < 0.01 and better["p_two"] == 2 * better["p_one"]
    mixed = report.paired_test([0.02, -0.03, 0.01])
    assert mixed["p_one"] > 0.4 and mixed["positive"] == 2 and mixed["sign_p_one"] == 0.5


def test_the_select_split_is_held_out_apart_from_the_reported_one():
    size = bench.SIZES["cpu"]
    val = torch.cat([x for x, _ in corpus.validation_batches(size.seq_len, size.batch, size.eval_batches)])
    select = torch.cat([x for x, _ in corpus.validation_batches(size.seq_len, size.batch, size.eval_batches,
                                                                split="select")])
    assert val.shape == select.shape
    ids = corpus.token_ids("val")
    n = val.shape[0] * size.seq_len
    assert torch.equal(val.flatten(), torch.from_numpy(ids[:n].astype("int64")))  # from the start...
    assert torch.equal(select.flatten(), torch.from_numpy(ids[len(ids) - 1 - n:len(ids) - 1].astype("int64")))
    assert len(ids) - 1 - n >= n  # ...and from the end, not overlapping
    with pytest.raises(ValueError, match="too short for disjoint val and select"):
        list(corpus.validation_batches(256, 64, 40, split="select"))


def test_the_lr_is_chosen_on_the_select_split_and_closures_are_paired_by_seed():
    def run(method, lr, seed, val_loss, select_loss=None):
        rec = dict(run_id=f"{method}_lr{lr:g}_s{seed}", method=method, lr=lr, seed=seed, val_loss=val_loss,
                   val_ppl=math.exp(val_loss), overlap=[], effective_rank=[], seconds=1.0)
        return rec if select_loss is None else dict(rec, select_loss=select_loss)

    runs = [run("GaLore", 0.01, 0, 4.60, 4.70), run("GaLore", 0.02, 0, 4.55, 4.75),  # val prefers 0.02, select 0.01
            run("GaLore", 0.01, 1, 4.62, 4.72), run("GaLore", 0.01, 2, 4.61, 4.71),
            run("SARA-GaLore", 0.01, 0, 4.58, 4.68), run("SARA-GaLore", 0.01, 1, 4.60, 4.70),
            run("SARA-GaLore", 0.01, 2, 4.60, 4.70),
            run("AdamW-split", 0.01, 0, 4.50), run("AdamW-split", 0.01, 1, 4.52), run("AdamW-split", 0.01, 2, 4.51)]
    summary = report.summarize({r["run_id"]: r for r in runs})
    assert summary["GaLore"]["lr"] == 0.01 and summary["GaLore"]["selected_on"] == "select"
    assert summary["GaLore"]["sweep_seeds"] == [0] and summary["GaLore"]["n"] == 3
    assert summary["AdamW-split"]["selected_on"] == "val"  # results without a select loss say so
    (row,) = [r for r in report.closures(summary) if r["base"] == "GaLore"]
    assert row["seeds"] == [0, 1, 2] and row["paired_reference"]
    expected = [(math.exp(b) - math.exp(s)) / (math.exp(b) - math.exp(a))
                for b, s, a in ((4.60, 4.58, 4.50), (4.62, 4.60, 4.52), (4.61, 4.60, 4.51))]
    assert all(abs(x - y) < 1e-12 for x, y in zip(row["seed_closures"], expected))
    assert row["test"]["positive"] == 3 and abs(row["test"]["mean"] - (0.02 + 0.02 + 0.01) / 3) < 1e-12
    # a seed whose base beats its own full-rank run has no gap: n/a there, out of the per-seed mean (which a ratio
    # of two negatives would have inflated), still in the paired test
    runs[-1] = run("AdamW-split", 0.01, 2, 4.65)
    (row,) = [r for r in report.closures(report.summarize({r["run_id"]: r for r in runs})) if r["base"] == "GaLore"]
    assert math.isnan(row["seed_closures"][2]) and row["seed_gaps"][2] < 0 and row["n"] == 2
    assert row["per_seed"][0] == pytest.approx(sum(expected[:2]) / 2) and row["test"]["n"] == 3
    assert bench.plan(bench.SIZES["cpu"], ["GaLore"], [0], lrs=[0.005, 0.01]) == [
        bench.RunSpec("GaLore", 0.005, 0), bench.RunSpec("GaLore", 0.01, 0)]
    per_method = bench.parse_lrs("GaLore=0.02,SARA-GaLore=0.005")
    assert bench.plan(bench.SIZES["cpu"], ["AdamW-split", "GaLore", "SARA-GaLore"], [1], lrs=per_method) == [
        bench.RunSpec("AdamW-split", 0.01, 1), bench.RunSpec("GaLore", 0.02, 1), bench.RunSpec("SARA-GaLore", 0.005, 1)]
    with pytest.raises(ValueError, match="'Galore=0.01' is not METHOD=LR"):
        bench.parse_lrs("Galore=0.01")


def test_the_end_of_run_evaluation_reports_its_precision():
    """token_losses: the mean over every predicted token (what the model's own loss gives batch by batch), its
    standard error from the per-token variance, and window means that average back to the loss."""
    size = bench.SIZES["smoke"]
    model, *_ = bench.build(bench.RunSpec("AdamW", size.adamw_lrs[0], 0), size, "cpu")
    windows = corpus.held_out_windows(size.seq_len, "prose", "val", 4096)
    assert windows.shape == (4096 // size.seq_len, size.seq_len + 1)
    found = bench.token_losses(lambda x: model(x), windows, 16, "cpu")
    with torch.no_grad():
        per_token = torch.cat([torch.nn.functional.cross_entropy(model(w[:, :-1]).reshape(-1, 4096),
                                                                  w[:, 1:].reshape(-1), reduction="none")
                               for w in windows.split(7)]).double()
        by_batch = statistics.mean(model(w[:, :-1], w[:, 1:]).item() for w in windows.split(16))
    assert found["tokens"] == per_token.numel() == 4096
    assert found["loss"] == pytest.approx(per_token.mean().item(), abs=1e-6)
    assert found["loss"] == pytest.approx(by_batch, abs=1e-5)  # equal batches: the mean of the batch means
    assert found["se"] == pytest.approx((per_token.std() / math.sqrt(per_token.numel())).item(), rel=1e-6)
    assert found["windows"].mean().item() == pytest.approx(found["loss"], abs=1e-9)
    assert bench.window_se(found["windows"]) == pytest.approx(
        (found["windows"].std() / math.sqrt(len(found["windows"]))).item())


def test_the_held_out_splits_are_disjoint_and_cover_the_validation_text():
    ids = torch.from_numpy(corpus.token_ids("val").astype("int64"))
    val, select = (corpus.held_out_windows(128, "prose", split) for split in ("val", "select"))
    half = (len(ids) - 1) // 2
    # consecutive windows share one token: the last one's target is the next one's first input
    assert torch.equal(val[:, :-1].flatten(), ids[:val.shape[0] * 128])
    assert torch.equal(select[:, :-1].flatten(), ids[half:half + select.shape[0] * 128])
    assert val.shape[0] * 128 <= half and val.shape[0] == half // 128  # every predicted token before the other's
    assert corpus.held_out_windows(128, "prose", "val", 1000).shape[0] == 1000 // 128
    with pytest.raises(ValueError, match="split='train'"):
        corpus.held_out_windows(128, "prose", "train")


def test_the_report_pairs_runs_on_their_windows(tmp_path):
    """The per-seed table: each figure with its SE, each paired difference with the SE of the per-window
    differences (on the same windows), from the windows/ files the runs wrote."""
    import numpy

    rng = numpy.random.default_rng(0)
    common = rng.normal(4.6, 0.5, 400)  # the windows' own difficulty, shared by both runs
    runs = {}
    for method, shift, seed in (("GaLore", 0.02, 0), ("SARA-GaLore", 0.0, 0), ("AdamW-split", -0.05, 0),
                                ("GaLore", 0.03, 1), ("SARA-GaLore", 0.0, 1), ("AdamW-split", -0.05, 1)):
        windows = common + shift + rng.normal(0, 0.01, 400)
        run_id = f"{method}_lr0.01_s{seed}"
        os.makedirs(tmp_path / "windows", exist_ok=True)
        numpy.savez_compressed(tmp_path / "windows" / f"{run_id}.npz", val=windows.astype("float32"),
                               select=windows.astype("float32"))
        loss = float(windows.astype("float32").astype("float64").mean())
        runs[run_id] = dict(run_id=run_id, method=method, lr=0.01, seed=seed, val_loss=loss, val_ppl=math.exp(loss),
                            val_se=0.5 / math.sqrt(400 * 32), val_tokens=400 * 32, select_loss=loss, overlap=[],
                            effective_rank=[], seconds=1.0, val=[[10, loss]])
    (row,) = [r for r in report.closures(report.summarize(runs), str(tmp_path)) if r["base"] == "GaLore"]
    a = report.load_windows(str(tmp_path), "GaLore_lr0.01_s0")
    b = report.load_windows(str(tmp_path), "SARA-GaLore_lr0.01_s0")
    d = a - b
    assert row["seed_rows"][0]["diff_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)))
    assert row["seed_rows"][0]["diff_se"] < 0.001 < runs["GaLore_lr0.01_s0"]["val_se"]  # pairing removes the shared part
    meta = dict(config=dataclasses.asdict(bench.SIZES["smoke"]), torch="x", device="cpu")
    text = report.markdown(report.summarize(runs), meta, "cmd", str(tmp_path))
    assert "Per seed, with standard errors" in text and "tokens per figure: 12,800" in text
    assert f"{row['seed_rows'][0]['diff']:+.4f} ± {row['seed_rows'][0]['diff_se']:.4f}" in text


def test_a_campaign_extends_a_sweep_until_its_choice_is_bracketed():
    from sara_bench import campaign

    def summary(method, chosen, grid):
        return {method: dict(lr=chosen, grid={lr: None for lr in grid})}

    assert campaign.unbracketed(summary("GaLore", 0.04, (0.01, 0.02, 0.04)), {"GaLore": []}) == {"GaLore": 0.08}
    assert campaign.unbracketed(summary("GaLore", 0.01, (0.01, 0.02, 0.04)), {"GaLore": []}) == {"GaLore": 0.005}
    assert campaign.unbracketed(summary("GaLore", 0.02, (0.01, 0.02, 0.04)), {"GaLore": []}) == {}
    assert set(campaign.CAMPAIGNS) == {"code4k", "prose6"}
    for spec in campaign.CAMPAIGNS.values():
        assert len(spec["seeds"]) >= 6 and spec["data"] in corpus.DATA
