"""The manual builds in mkdocs' strict mode (a broken link, anchor or missing page fails), and every figure the
docs mark as measured points at a raw file that names its command, device and commit."""
import os
import shutil
import subprocess
import sys

import pytest

from launch_utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_figures  # noqa: E402


def test_every_measured_figure_has_a_raw_file():
    report, failures = check_figures.check()
    print("\n".join(report))
    assert not failures, "\n".join(failures)
    assert report, "the README's evidence table is marked as measured: the check must see it"


def test_the_check_fails_a_missing_raw_file_and_an_unmarked_measured_figure(tmp_path):
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    (tmp_path / "docs" / "bench" / "run.log").write_text("command: x\ndevice: cpu\ncommit: abc\n")
    (tmp_path / "docs" / "bench" / "bare.log").write_text("1.5 s\n")
    (tmp_path / "README.md").write_text("<!-- measured: docs/bench/run.log -->\n| a | 1.5 s |\n\nFine: 2.5 s.\n")
    (tmp_path / "docs" / "page.md").write_text(
        "We measured 3.5 ms here.\n\n<!-- measured: bench/gone.log -->\n1.0\n\n<!-- measured: bench/bare.log -->\n"
        "2.0\n")
    report, failures = check_figures.check(str(tmp_path))
    assert len(report) == 1 and "run.log" in report[0]
    assert len(failures) == 3, failures
    assert "no <!-- measured" in failures[0] and "gone.log does not exist" in failures[1]
    assert "bare.log" in failures[2] and "does not name" in failures[2]


@pytest.mark.timeout(300)
def test_the_manual_builds_in_strict_mode(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (the docs extra: pip install -e '.[docs]')")
    run = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=280)
    print(run.stdout + run.stderr)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert (tmp_path / "site" / "support" / "index.html").is_file()
