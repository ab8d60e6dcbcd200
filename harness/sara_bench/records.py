"""What the benchmark and its report share: the methods, the run sizes' schema and the results file.

``bench`` (which trains) and ``report`` (which only reads ``results.jsonl`` and ``meta.json``) both
import this module; neither imports the other.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

@dataclass(frozen=True)
class Method:
    name: str
    optimizer: str  # "AdamW" (torch, full rank) or a sara_ds optimizer class name
    preset: str | None = None


METHODS = (
    Method("AdamW", "AdamW"),
    # Full-rank control with the low-rank methods' own per-group lrs (matrices at lr * scale, the rest at lr).
    # At small scale most of GaLore's edge over uniform-lr AdamW is that split (shared/notes/data.md).
    Method("AdamW-split", "AdamW", "split"),
    Method("GaLore", "SaraAdamW", "galore"),
    Method("SARA-GaLore", "SaraAdamW", "sara"),
    Method("Fira", "SaraAdamW", "fira"),
    Method("SARA-Fira", "SaraAdamW", "sara_fira"),
    Method("GoLore", "SaraAdamW", "golore"),
    Method("OSD", "SaraAdamW", "osd"),
    Method("GrassWalk", "SaraAdamW", "grasswalk"),
    Method("GrassJump", "SaraAdamW", "grassjump"),
    Method("GaLore-Adafactor", "SaraAdafactor", "galore"),
    Method("SARA-Adafactor", "SaraAdafactor", "sara"),
    Method("GaLore-Adam-mini", "SaraAdamMini", "galore"),
    Method("SARA-Adam-mini", "SaraAdamMini", "sara"),
)
METHOD_BY_NAME = {m.name: m for m in METHODS}
# (low-rank base, the same base with SARA's importance sampling): the paper's gap-closure pairs.
CLOSURE_PAIRS = (("GaLore", "SARA-GaLore"), ("Fira", "SARA-Fira"), ("GaLore-Adafactor", "SARA-Adafactor"),
                 ("GaLore-Adam-mini", "SARA-Adam-mini"))


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    steps: int
    eval_every: int
    eval_batches: int
    adamw_lrs: tuple
    lowrank_lr: float
    seeds: tuple = (0, 1, 2)
    intermediate: int | None = None
    checkpoint_every: int = 100
    jobs: int = 2
    data: str = "prose"  # or "code": sara_bench.corpus.DATA
    # the end-of-run evaluation: every window of the held-out splits, up to this many predicted tokens each
    # (None: the whole split); the curve along the run reads the first ``eval_batches`` batches only
    final_eval_tokens: int | None = None

    @property
    def ffn(self) -> int:
        from .llama import swiglu_width

        return self.intermediate or swiglu_width(self.hidden)

    @property
    def rank(self) -> int:
        return self.hidden // 4

    @property
    def update_proj_gap(self) -> int:
        return max(1, self.steps // 40)


def load_results(path: str) -> dict:
    """run_id -> record for every finished run in a ``results.jsonl`` (empty if there is none)."""
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    results[rec["run_id"]] = rec
    return results


def append_result(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
