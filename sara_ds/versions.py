"""The engine releases sara_ds is tested with, and the check each integration runs when it first meets an engine.

CI runs the engine suites at both ends of each range (``.ci/run``: the main suite at the newest DeepSpeed and
megatron-core 0.16.1, ``scripts/version_legs.sh`` at the other ends); ``pyproject.toml`` claims exactly these ranges.
A release outside one fails at start-up, naming the installed version and the range; ``SARA_DS_UNTESTED_ENGINES=1``
lets it run at the user's risk.
"""
from __future__ import annotations

import os
import re
from importlib import metadata

# DeepSpeed 0.19.7 and older fail the ZeRO suites (docs/bench/versions/): below 0.19.8 an fp32 ZeRO-1/2 step
# with a non-finite gradient in one param group still moves the others (half a step), and 0.18.9 has no
# zero_compute_grad_norm at all.
TESTED = {"deepspeed": ("0.19.8", "0.19.8"), "megatron-core": ("0.16.1", "0.19.2")}
OVERRIDE = "SARA_DS_UNTESTED_ENGINES"


def release(version: str) -> tuple:
    """'0.19.8' -> (0, 19, 8); a local or pre-release suffix ('+cu121', 'rc1', '.dev0') is dropped."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check(package: str, installed: str | None = None) -> str:
    """The installed version of ``package``, if it lies in the tested range; else an error that says how to go on."""
    version = installed if installed is not None else metadata.version(package)
    low, high = TESTED[package]
    if release(low) <= release(version)[:len(release(low))] <= release(high):
        return version
    if os.environ.get(OVERRIDE) == "1":
        return version
    raise RuntimeError(
        f"sara_ds: {package} {version} is installed, but sara_ds is tested with {package} {low} to {high}. Install a "
        f"release in that range (pip install '{package}>={low},<={high}'), or set {OVERRIDE}=1 to run this one at "
        "your own risk.")
