"""Start N ranks of a Python script with explicit env:// variables, a free port and a hard timeout."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

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


class RanksHung(AssertionError):
    pass


def run_ranks(script, world, args=(), timeout=300, env_extra=None, grace=60):
    """Run ``world`` copies of ``script``; return [(returncode, output)] per rank.

    A rank that hangs is aborted (SIGABRT: with PYTHONFAULTHANDLER set, its log ends in every thread's Python
    stack) then killed: past ``timeout``, ``grace`` seconds after a peer failed (its collectives then wait on a
    dead rank), or when the test itself is interrupted (pytest-timeout). A hang raises RanksHung with every rank's
    tail."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        log = tempfile.TemporaryFile(mode="w+")
        env = base_env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world,
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONFAULTHANDLER="1", **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)

    def tails():
        out = []
        for rank, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            out.append(f"rank {rank} (exit {p.returncode}):\n{log.read()[-4000:]}")
        return "\n".join(out)

    start, failed_at = time.monotonic(), None
    try:
        while None in [p.poll() for p in procs]:  # every rank polled: a list, not any()'s short circuit
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now - start > timeout or (failed_at is not None and now - failed_at > grace):
                _abort(procs)
                why = f"{timeout} s" if now - start > timeout else f"{grace} s after a peer failed"
                raise RanksHung(f"{os.path.basename(script)}: ranks still running after {why}; "
                                f"each rank's tail:\n{tails()}")
            time.sleep(0.2)
    except BaseException as exc:
        if any(p.poll() is None for p in procs):  # interrupted from outside: stacks first, then the tails
            _abort(procs)
            print(f"run_ranks interrupted ({type(exc).__name__}); each rank's tail:\n{tails()}", flush=True)
        raise
    out = []
    for p, log in zip(procs, logs):
        log.seek(0)
        out.append((p.returncode, log.read()))
    return out


def _abort(procs, wait=5.0):
    """SIGABRT (faulthandler prints the Python stacks), then SIGKILL for whatever is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
    end = time.monotonic() + wait
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


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
