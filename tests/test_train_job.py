"""The main job (examples/train.py) through the real `deepspeed` launcher, every shipped config, and a rank crash.

Everything here trains in fp32 (``--dtype fp32``), which is cheap on any CPU, except one 4-step bf16 run of the
shipped sara.json (``--dtype bf16``), small enough to be cheap where bf16 is emulated. Training is judged against
the untrained model, whose validation perplexity examples/train.py measures at step 0 (near 4096, the
vocabulary size): an optimizer that never moves the weights stays there.
"""
import csv
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("deepspeed")

from launch_utils import ROOT, base_env, free_port, run_ranks  # noqa: E402

TRAIN = os.path.join(ROOT, "examples", "train.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
SMALL = ["--hidden", "64", "--layers", "2", "--heads", "2", "--seq_len", "64", "--no_progress"]
FP32 = ["--dtype", "fp32"]


def _deepspeed(args, cwd, timeout=300, env=None, ranks=2):
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), TRAIN, *args]
    return subprocess.run(cmd, cwd=cwd, env=env or base_env(), capture_output=True, text=True, timeout=timeout)


def _shm_files():
    return set(glob.glob("/dev/shm/deepspeed*"))


def test_main_job_through_the_deepspeed_launcher(tmp_path):
    ext = tmp_path / "ext"
    shm_before = _shm_files()
    config = os.path.join(ROOT, "configs", "ds", "sara.json")
    summary = tmp_path / "summary.json"
    ckpt = tmp_path / "ckpt"
    run = _deepspeed(["--deepspeed_config", config, "--steps", "60", "--eval_interval", "30", "--eval_batches", "2",
                      "--summary_json", str(summary), "--save_dir", str(ckpt), *SMALL, *FP32], cwd=tmp_path,
                     env=base_env(TORCH_EXTENSIONS_DIR=ext))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = run.stdout + run.stderr
    assert "[sara_ds] summary:" in out and " 30:" in out and "[sara_ds] dtype fp32: --dtype fp32" in out
    result = json.loads(summary.read_text())
    assert result["world"] == 2 and result["launcher"] == "deepspeed"
    # against the untrained model (step 0). Measured here: 4128 -> 1563 (step 30) -> 954 (step 60), i.e. 0.23 of
    # the baseline, and a final train loss of 6.70 against ln(4128) = 8.33. With lr 0 both stay at the baseline.
    print(f"\nval ppl {result['val_history']}, final train loss {result['final_loss']:.3f}")
    (s0, untrained), (s30, mid), (s60, final) = result["val_history"]
    assert (s0, s30, s60) == (0, 30, 60) and 3000 < untrained < 6000, result["val_history"]
    assert final < 0.4 * untrained and final < mid, result["val_history"]
    assert result["final_loss"] < math.log(untrained) - 1.0, result
    assert result["refreshes"] == 2 * 7 * 2  # 14 matrices, refreshed at steps 0 and 50
    # subspace overlap logged through DeepSpeed's csv_monitor
    overlap_files = glob.glob(str(tmp_path / "runs" / "sara" / "Train_subspace_overlap_mean.csv"))
    assert overlap_files, os.listdir(tmp_path / "runs" / "sara")
    rows = list(csv.reader(open(overlap_files[0])))
    assert len(rows) >= 2 and 0.0 <= float(rows[-1][1]) <= 1.0
    # the CPU traps: nothing JIT-compiled, nothing left in /dev/shm
    assert not any(ext.rglob("*.so")) and _shm_files() <= shm_before
    # a node is lost: the README's commands resume the 2-rank run on 1 rank through the universal checkpoint
    convert = subprocess.run([sys.executable, "-m", "sara_ds.ds_to_universal", "--input_folder", str(ckpt / "step60"),
                              "--output_folder", str(ckpt / "step60_universal")], cwd=ROOT, env=base_env(),
                             capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stdout[-3000:] + convert.stderr[-3000:]
    assert "[sara_ds] wrote the state of 21 parameters (14 projected; saved at DP=2)" in convert.stdout, convert.stdout[-2000:]
    resumed = _deepspeed(["--deepspeed_config", config, "--steps", "70", "--eval_interval", "10", "--eval_batches", "2",
                          "--summary_json", str(summary), "--save_dir", str(ckpt), "--resume", "--load_universal",
                          *SMALL, *FP32], cwd=tmp_path, env=base_env(TORCH_EXTENSIONS_DIR=ext), ranks=1)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    after = json.loads(summary.read_text())
    assert "steps=60->70" in resumed.stdout + resumed.stderr and after["world"] == 1
    # the refresh counters came back with the state (a fresh state would have refreshed all 14 at step 60: 14)
    assert after["refreshes"] == 2 * 7 * 2, after
    print(f"resumed on 1 rank from the 2-rank step-60 checkpoint: val ppl {after['val_history']}")
    assert after["val_history"][-1][1] < mid, after["val_history"]


CONFIGS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "ds", "*.json")))


@pytest.mark.parametrize("name,dtype", [(n, "fp32") for n in CONFIGS] + [("sara", "bf16")])
def test_every_shipped_config_trains(name, dtype, tmp_path):
    config = os.path.join(ROOT, "configs", "ds", f"{name}.json")
    summary = tmp_path / "summary.json"
    results = run_ranks(TRAIN, 2, ["--deepspeed_config", config, "--steps", "4", "--eval_interval", "4",
                                   "--eval_batches", "1", "--summary_json", summary, *SMALL, "--dtype", dtype],
                        timeout=300)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank}: {log[-3000:]}"
    result = json.loads(summary.read_text())
    assert f"zero_stage={json.load(open(config))['zero_optimization']['stage']} dtype={dtype} " in results[0][1]
    cfg = json.load(open(config))
    expected_type = cfg["optimizer"]["type"]
    tp = cfg.get("tensor_parallel", {}).get("autotp_size", 1)  # sara_tp on 2 ranks: TP=2 x DP=1
    assert (result["tp"], result["dp"]) == (tp, 2 // tp)
    if cfg["zero_optimization"]["stage"] == 0:
        assert result["refreshes"] == 2 * 14  # replicated: every rank refreshes every matrix
    else:  # partitioned over DP (a straddler is refreshed by each owner); each TP rank refreshes its own shards
        assert 14 * tp <= result["refreshes"] <= 14 * tp + 2
    # 4 warm-up steps (lr up to 0.4 of peak) already move the model off the untrained one. Measured, val ppl after
    # 4 steps / untrained: 0.950-0.970 for every config (0.970 in bf16). Never stepping leaves it at exactly 1.
    (_, untrained), (_, after) = result["val_history"]
    print(f"\n{name} {dtype}: val ppl {untrained:.1f} -> {after:.1f} ({after / untrained:.3f}) in 4 steps")
    assert after < 0.985 * untrained, result["val_history"]
    assert f"optimizer={expected_type}" in results[0][1]


def _children_with(pid, marker):
    import psutil

    return [c for c in psutil.Process(pid).children(recursive=True) if marker in " ".join(c.cmdline())]


def test_a_killed_rank_ends_the_job_and_resume_reaches_the_same_weights(tmp_path):
    config = os.path.join(ROOT, "configs", "ds", "sara.json")
    common = ["--deepspeed_config", config, "--steps", "40", "--eval_interval", "40", "--eval_batches", "1", *SMALL,
              *FP32]
    straight = tmp_path / "straight.pt"
    run = _deepspeed([*common, "--dump_weights", str(straight)], cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]

    ckpt = tmp_path / "ckpt"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, *common,
           "--save_dir", str(ckpt), "--save_interval", "10"]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (ckpt / "step20").exists() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        assert (ckpt / "step20").exists(), "no checkpoint appeared"
        victims = _children_with(launcher.pid, "--local_rank=1")
        assert victims, "rank 1 not found"
        killed_at = time.time()
        victims[0].send_signal(signal.SIGKILL)
        launcher.wait(timeout=120)  # must end, not hang on the dead peer
        ended_after = time.time() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    print(f"\nrank 1 SIGKILLed; the job ended after {ended_after:.1f}s with code {launcher.returncode}")
    assert launcher.returncode != 0

    # Killed as soon as step20's folder appears, often while step20 is still being written: then `latest` must
    # still name step10 (a complete checkpoint), never a half-written one.
    latest = (ckpt / "latest").read_text().strip()
    assert latest in ("step10", "step20", "step30"), latest
    resumed = tmp_path / "resumed.pt"
    run = _deepspeed([*common, "--save_dir", str(ckpt), "--resume", "--dump_weights", str(resumed)], cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"steps={latest[4:]}->40" in run.stdout
    a, b = torch.load(straight), torch.load(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_main_job_at_tp2_dp2_with_autotp(tmp_path):
    """configs/ds/sara_tp.json (AutoTP + ZeRO-2) through the deepspeed launcher on 4 CPU ranks: TP=2 x DP=2."""
    config = os.path.join(ROOT, "configs", "ds", "sara_tp.json")
    summary = tmp_path / "summary.json"
    run = _deepspeed(["--deepspeed_config", config, "--steps", "12", "--eval_interval", "12", "--eval_batches", "2",
                      "--summary_json", str(summary), *SMALL, *FP32], cwd=tmp_path, ranks=4)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = run.stdout + run.stderr
    assert "world=4 (TP=2 x DP=2)" in out and "bytes put into TP collectives at refreshes" in out
    result = json.loads(summary.read_text())
    print(f"\nTP=2 x DP=2: val ppl {result['val_history']}, TP bytes per rank {result['tp_bytes_per_rank']}")
    assert (result["tp"], result["dp"]) == (2, 2)
    # every rank took part in the refreshes' TP collectives (TP rank 0 also broadcasts the chosen bases)
    assert all(b > 0 for b in result["tp_bytes_per_rank"])
    # all four ranks agree on the gathered weights
    sums = re.findall(r"weights checksum (\d\.\d{10}e[+-]\d+)", out)
    assert len(sums) == 4 and len(set(sums)) == 1, sums
    (_, untrained), (_, final) = result["val_history"]
    assert final < 0.85 * untrained, result["val_history"]
