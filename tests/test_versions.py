"""The engine releases sara_ds claims (pyproject.toml's extras) are the ones it tests (sara_ds/versions.py), and an
engine outside them stops at start-up with the installed release, the range and the fix, unless overridden."""
import os
import re

import pytest

from launch_utils import ROOT
from sara_ds import versions


@pytest.mark.parametrize("package,version", [("deepspeed", "0.19.7"), ("deepspeed", "0.18.9"), ("deepspeed", "0.20.0"),
                                             ("megatron-core", "0.16.0"), ("megatron-core", "0.19.3")])
def test_a_release_outside_the_tested_range_is_refused_with_the_fix(monkeypatch, package, version):
    monkeypatch.delenv(versions.OVERRIDE, raising=False)
    low, high = versions.TESTED[package]
    with pytest.raises(RuntimeError, match=rf"{package} {re.escape(version)} is installed, but sara_ds is tested with "
                                           rf"{package} {low} to {high}.*pip install '{package}>={low},<={high}'"):
        versions.check(package, version)
    monkeypatch.setenv(versions.OVERRIDE, "1")
    assert versions.check(package, version) == version  # at the user's risk


@pytest.mark.parametrize("package,version", [("deepspeed", "0.19.8"), ("deepspeed", "0.19.8+cu130"),
                                             ("megatron-core", "0.16.1"), ("megatron-core", "0.18.0"),
                                             ("megatron-core", "0.19.2")])
def test_a_tested_release_passes(monkeypatch, package, version):
    monkeypatch.delenv(versions.OVERRIDE, raising=False)
    assert versions.check(package, version) == version


def test_the_package_claims_exactly_the_tested_ranges():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    ds = re.search(r'"deepspeed>=([\d.]+),<([\d.]+)"', text).groups()
    mc = re.search(r'"megatron-core>=([\d.]+),<=([\d.]+)"', text).groups()
    assert ds[0] == versions.TESTED["deepspeed"][0]
    assert versions.release(versions.TESTED["deepspeed"][1]) < versions.release(ds[1])  # <0.19.9: nothing untested
    assert versions.release(ds[1])[:2] == versions.release(versions.TESTED["deepspeed"][1])[:2]
    assert mc == versions.TESTED["megatron-core"]


def test_the_installed_engines_are_tested_ones():
    for package in ("deepspeed", "megatron-core"):
        pytest.importorskip(package.replace("-", "_").replace("megatron_core", "megatron.core"))
        assert versions.check(package)
