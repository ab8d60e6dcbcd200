"""benchmarks/train_step.py runs its rows end to end (plain PyTorch and DeepSpeed ZeRO-2) on a tiny model."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_row_trains_with_the_optimizer_it_names_and_times_a_later_refresh():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "harness")]), OMP_NUM_THREADS="1")
    rows = {}
    for engine, optimizer in (("plain", "sara_ds SaraAdamW"), ("zero2", "sara_ds SaraAdamW"),
                              ("zero2", "torch AdamW fused")):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--device", "cpu",
                              "--one", f"{engine}:{optimizer}:tiny", "--steps", "2", "--warmup", "1", "--dtype", "fp32",
                              "--batch", "2", "--seq_len", "16"],
                             capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("ROW ")]
        assert out.returncode == 0 and len(lines) == 1, out.stdout[-2000:] + out.stderr[-2000:]
        rows[engine, optimizer] = json.loads(lines[0][4:])
    # under ZeRO-2 the config's "SaraAdamW" is what steps the partitions, not a fallback
    assert rows["zero2", "sara_ds SaraAdamW"]["stepped_by"] == "SaraAdamW"
    assert rows["plain", "sara_ds SaraAdamW"]["stepped_by"] == "SaraAdamW"
    assert rows["zero2", "torch AdamW fused"]["stepped_by"] == "AdamW"
    for (engine, optimizer), row in rows.items():
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0
        if optimizer.startswith("sara_ds"):  # the timed refresh, and T=200 amortising it
            assert row["refresh_s"] > 0
            assert row["amortised_tokens_per_s"] < row["tokens_per_s"]
        else:
            assert row["refresh_s"] is None and row["amortised_tokens_per_s"] == row["tokens_per_s"]
