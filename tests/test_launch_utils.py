"""The multi-rank harness turns a hang into a failure that shows where every rank was."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch_utils import RanksHung, run_ranks  # noqa: E402

SCRIPT = """
import os, sys, time
def wait_for_peers():
    time.sleep(3600)
if os.environ["RANK"] == sys.argv[1]:
    print("rank", os.environ["RANK"], "fails", flush=True)
    sys.exit(3)
wait_for_peers()
"""


def _script(tmp_path):
    path = tmp_path / "ranks.py"
    path.write_text(SCRIPT)
    return path


def test_a_rank_that_dies_ends_the_run_after_the_grace_with_every_ranks_stack(tmp_path):
    with pytest.raises(RanksHung) as hung:
        run_ranks(_script(tmp_path), 2, ["1"], timeout=120, grace=2)
    message = str(hung.value)
    assert "2 s after a peer failed" in message
    assert "rank 1 (exit 3):\nrank 1 fails" in message
    rank0 = message[message.index("rank 0 (exit"):message.index("rank 1 (exit")]
    assert "in wait_for_peers" in rank0, rank0  # faulthandler's stack of the rank left waiting


def test_ranks_past_the_timeout_are_aborted_and_reported(tmp_path):
    with pytest.raises(RanksHung) as hung:
        run_ranks(_script(tmp_path), 2, ["none"], timeout=2)
    message = str(hung.value)
    assert "after 2 s" in message
    assert message.count("in wait_for_peers") == 2


def test_ranks_that_finish_return_each_code_and_log(tmp_path):
    path = tmp_path / "ok.py"
    path.write_text("import os; print('hello from', os.environ['RANK'])")
    assert run_ranks(path, 2, timeout=60) == [(0, "hello from 0\n"), (0, "hello from 1\n")]
