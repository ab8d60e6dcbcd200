"""The evidence campaigns: SARA against its base, paired by seed, with every lr chosen on the select split.

    python -m sara_bench.campaign code4k     # the code corpus: lr sweeps at seed 0, then 6 seeds (docs/bench/code4k)
    python -m sara_bench.campaign prose6     # the prose corpus: 6 seeds at long3's chosen lrs (docs/bench/prose6)
    python -m sara_bench.campaign code4k --dry-run    # what is left to run

The cpu size (4 x 128 LLaMA, r = 32, T = 37) for 1500 steps of 16 x 128 tokens, single-threaded runs two at a
time. A sweep starts from its grid; where a method's chosen lr lies on the grid's edge, the next lr out (x2 or /2)
is run, until every choice is bracketed. Then the other seeds run at the chosen lrs, seed-major, so a stopped
campaign leaves whole seeds. Everything is resumable: rerun the same command (finished runs are skipped, a run
cut short continues from its checkpoint), and results.jsonl, windows/ and the report are written into the folder
as each run finishes.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import bench, records, report

PAIRS = ("GaLore", "SARA-GaLore", "Fira", "SARA-Fira")
CAMPAIGNS = {
    # each method's lr is swept at seed 0 from these grids (AdamW-split: its embedding lr, matrices at x0.25)
    "code4k": dict(data="code4k", out="docs/bench/code4k", seeds=tuple(range(6)),
                   sweep={"AdamW-split": (0.005, 0.01, 0.02), **{m: (0.01, 0.02, 0.04) for m in PAIRS}}),
    # the lrs docs/bench/long3 chose on the select split (GaLore pair; the Fira pair and AdamW-split at the protocol's)
    "prose6": dict(data="prose", out="docs/bench/prose6", seeds=tuple(range(6)),
                   fixed={"AdamW-split": 0.01, "GaLore": 0.02, "SARA-GaLore": 0.02, "Fira": 0.01, "SARA-Fira": 0.01}),
}
STEPS = 1500


def unbracketed(summary: dict, grids: dict) -> dict:
    """method -> the next lr to try, for every method whose chosen lr is the lowest or highest it ran at."""
    out = {}
    for method in grids:
        s = summary.get(method)
        if s is None:
            continue
        tried = sorted(s["grid"])
        if s["lr"] == tried[-1]:
            out[method] = tried[-1] * 2
        elif s["lr"] == tried[0]:
            out[method] = tried[0] / 2
    return out


def run(name: str, jobs: int = 2, dry_run: bool = False, log=print) -> dict:
    spec = CAMPAIGNS[name]
    out = spec["out"]
    command = f"python -m sara_bench.campaign {name}"

    def bench_run(methods, seeds, lrs):
        if dry_run:
            done = records.load_results(os.path.join(out, "results.jsonl"))
            todo = [s.run_id for s in bench.plan(bench.SIZES["cpu"], methods, seeds, lrs) if s.run_id not in done]
            log(f"[campaign] {name}: to run {todo}")
            return done
        return bench.run_benchmark("cpu", out, jobs=jobs, methods=methods, seeds=seeds, steps=STEPS, log=log,
                                   command=command, data=spec["data"], lrs=lrs)

    if "sweep" in spec:
        grids = {m: list(g) for m, g in spec["sweep"].items()}
        while True:
            results = bench_run(list(grids), [0], grids)
            if dry_run or not results:
                break
            extend = unbracketed(report.summarize(results), grids)
            if not extend:
                break
            log(f"[campaign] {name}: chosen lr on the edge of its grid, extending: {extend}")
            for method, lr in extend.items():
                grids[method].append(lr)
        summary = report.summarize(records.load_results(os.path.join(out, "results.jsonl")))
        chosen = {m: [summary[m]["lr"]] for m in grids if m in summary}
    else:
        chosen = {m: [lr] for m, lr in spec["fixed"].items()}
    log(f"[campaign] {name}: lrs {chosen}")
    if not dry_run and len(chosen) == len(spec.get("sweep") or spec["fixed"]):
        bench_run(list(chosen), list(spec["seeds"]), chosen)  # seed-major (bench.plan): whole seeds first
        paths = report.write_report(out, out, command)
        log(f"[campaign] {name}: report {', '.join(paths)}")
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sara_bench.campaign", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(CAMPAIGNS))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (single-threaded each)")
    ap.add_argument("--dry-run", action="store_true", help="print what is left to run, run nothing")
    args = ap.parse_args(argv)
    try:
        run(args.name, args.jobs, args.dry_run, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print("[campaign] interrupted; rerun the same command to continue", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
