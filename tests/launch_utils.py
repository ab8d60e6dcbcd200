"""Start N ranks of a Python script with explicit env:// variables, a free port and a hard timeout."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "harness")  # sara_bench: example model, corpus, dtype rule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, HARNESS, env.get("PYTHONPATH", "")]),
               DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_ranks(script, world, args=(), timeout=300, env_extra=None):
    """Run ``world`` copies of ``script``; return [(returncode, output)] per rank. Kills all on timeout."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        log = tempfile.TemporaryFile(mode="w+")
        env = base_env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world,
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out = []
    for p, log in zip(procs, logs):
        log.seek(0)
        out.append((p.returncode, log.read()))
    return out


def run_scenarios(world, scenarios, timeout=300, worker="ds_worker.py"):
    """Run a tests/ worker on ``world`` ranks; return rank 0's results (one dict per scenario)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            json.dump({"scenarios": scenarios, "out": os.path.join(tmp, "result.pt"), "tmp": tmp}, f)
        results = run_ranks(os.path.join(ROOT, "tests", worker), world, [spec], timeout=timeout)
        failed = [(rank, code, log) for rank, (code, log) in enumerate(results) if code != 0]
        # every failed rank's tail: the one that died first is often not rank 0, whose error is then a reset peer
        assert not failed, "\n".join(f"rank {rank} exited {code}:\n{log[-3000:]}" for rank, code, log in failed)
        import torch
        return torch.load(os.path.join(tmp, "result.pt"), weights_only=False)
