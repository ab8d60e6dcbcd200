"""The sara-ds wheel is the optimizers alone: torch its only hard dependency, no harness inside, and it works in a
clean venv (no system site-packages) that holds nothing but torch==2.13.0 and the wheel.

Measured on the 2-core CI box: 50 s in all (build 1.7 s, venv 6.8 s, installing torch from the local wheel
cache 36 s, the smoke step 4.9 s).
"""
import ast
import email.parser
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS_ONLY = ("numpy", "tokenizers", "tqdm", "matplotlib", "sara_bench")  # what the library must never import
MOVED = ("bench", "bench_report", "report", "records", "llama", "corpus", "cli", "precision", "__main__")
SMOKE = """
import sys, torch, sara_ds
w = torch.nn.Parameter(torch.randn(8, 8)); before = w.detach().clone()
opt = sara_ds.SaraAdamW([{'params': [w], 'rank': 2, 'update_proj_gap': 2}]); w.grad = torch.randn(8, 8); opt.step()
assert not torch.equal(before, w.detach()), 'the step did not change the weight'
stray = sorted(m for m in sys.modules if m.split('.')[0] in %r)
assert not stray, stray
print('SMOKE-OK', sara_ds.__file__)
""" % (HARNESS_ONLY + ("deepspeed", "megatron"),)


def _run(cmd, timeout, **kw):
    t0 = time.time()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, time.time() - t0


def _imported_modules(source: str) -> set:
    """Every module a file imports, at module level or inside functions (lazily)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.add(base)
            found.update(f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names)
    return found


@pytest.mark.timeout(600)
def test_the_wheel_holds_the_optimizers_only_and_installs_into_a_clean_venv(tmp_path):
    # Build from a copy: an in-tree build reuses build/lib, where files of an older layout can linger.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "runs", "bench_results"))
    wheels = tmp_path / "wheels"
    _, t_build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels,
                       src], timeout=300)
    (wheel,) = wheels.glob("sara_ds-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = email.parser.Parser().parsestr(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        sources = {n: zf.read(n).decode() for n in names if n.endswith(".py")}
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]

    # only the sara_ds package and its metadata; none of the harness
    assert all(n.startswith(("sara_ds/", "sara_ds-")) for n in names), names
    harness = [n for n in names if re.search(r"bench|llama|corpus|/data/|tokenizer|\.gz$|cli\.py|__main__", n)]
    assert not harness, harness
    assert {"sara_ds/__init__.py", "sara_ds/optim.py", "sara_ds/integrations/deepspeed.py",
            "sara_ds/sharding/zero.py", "sara_ds/layout.py", "sara_ds/functional.py", "sara_ds/spectral.py",
            "sara_ds/banks.py"} <= set(names)
    assert not entry_points, "the optimizer wheel ships no console script (the benchmark is sara-bench, in harness/)"

    # torch is the only unconditional requirement; the engines are extras
    requires = meta.get_all("Requires-Dist") or []
    unconditional = [re.split(r"[ <>=!~;\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
    assert unconditional == ["torch"], requires
    assert {"deepspeed", "megatron", "mpi", "dev"} <= set(meta.get_all("Provides-Extra") or []), meta.get_all("Provides-Extra")

    # no module of the library imports the harness's dependencies or the moved modules, even lazily
    for name, text in sources.items():
        imported = _imported_modules(text)
        bad = sorted(m for m in imported if m.lstrip(".").split(".")[0] in HARNESS_ONLY
                     or m.rsplit(".", 1)[-1] in MOVED and (m.startswith(".") or m.startswith("sara_ds")))
        assert not bad, (name, bad)

    # a clean venv: no system site-packages, so nothing from this environment can leak in
    venv = tmp_path / "venv"
    _, t_venv = _run([sys.executable, "-m", "venv", venv], timeout=300)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    _, t_install = _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "torch==2.13.0", wheel],
                        timeout=480, env=env)
    # run from an empty folder, so the checkout's sara_ds cannot be imported instead of the installed one
    work = tmp_path / "work"
    work.mkdir()
    proc, t_smoke = _run([py, "-c", SMOKE], timeout=300, env=dict(env, OMP_NUM_THREADS="1"), cwd=work)
    assert "SMOKE-OK" in proc.stdout and str(venv) in proc.stdout, proc.stdout
    print(f"\nwheel {wheel.name}: build {t_build:.1f}s, venv {t_venv:.1f}s, install torch + wheel {t_install:.1f}s, "
          f"smoke {t_smoke:.1f}s")
