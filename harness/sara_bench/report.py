"""The evidence benchmark's report: a Markdown table and three PNGs, read from results.jsonl and meta.json.

    closure = (ppl_base - ppl_base+SARA) / (ppl_base - ppl_AdamW)

with ppl_AdamW the best full-rank AdamW: the lowest mean validation perplexity over the
uniform-lr grid and the split-lr control (the low-rank methods' own per-group lrs at full rank).
"""
from __future__ import annotations

import json
import math
import os
import statistics

from .records import CLOSURE_PAIRS, METHODS, Size, load_results

# Methods whose bases come from a rule with a subspace worth watching, for the overlap figure.
OVERLAP_METHODS = ("GaLore", "SARA-GaLore", "Fira", "SARA-Fira", "OSD", "GoLore")
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAMW_PANEL = ("AdamW", "AdamW-split", "GaLore", "SARA-GaLore", "Fira", "SARA-Fira", "GoLore", "OSD", "GrassWalk", "GrassJump")
OTHER_PANEL = ("AdamW-split", "GaLore", "SARA-GaLore", "GaLore-Adafactor", "SARA-Adafactor", "GaLore-Adam-mini",
               "SARA-Adam-mini")
STYLE = {  # SARA variants solid, their dominant-subspace bases dashed, in matching colours
    "AdamW": ("black", ":"), "AdamW-split": ("black", "-"), "GaLore": ("tab:blue", "--"), "SARA-GaLore": ("tab:blue", "-"),
    "Fira": ("tab:orange", "--"), "SARA-Fira": ("tab:orange", "-"), "GoLore": ("tab:gray", ":"),
    "OSD": ("tab:purple", "-."), "GrassWalk": ("tab:brown", "-."), "GrassJump": ("tab:pink", "-."),
    "GaLore-Adafactor": ("tab:green", "--"), "SARA-Adafactor": ("tab:green", "-"),
    "GaLore-Adam-mini": ("tab:red", "--"), "SARA-Adam-mini": ("tab:red", "-"),
}


def _mean_std(values):
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2) / 2 for t > 0."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Numerical Recipes' betacf)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)

    def guard(v):
        return v if abs(v) > 1e-300 else 1e-300

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + numerator * d)
            c = guard(1.0 + numerator / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    return front * h / a


def paired_test(differences) -> dict:
    """Paired t-test and exact sign test of per-seed differences (positive: the SARA run is better)."""
    d = list(differences)
    n = len(d)
    out = dict(n=n, mean=statistics.mean(d) if d else float("nan"), t=float("nan"), p_one=float("nan"),
               p_two=float("nan"), positive=sum(x > 0 for x in d), sign_p_one=float("nan"))
    if n >= 2:
        sd = statistics.stdev(d)
        t = out["mean"] / (sd / math.sqrt(n)) if sd > 0 else math.copysign(math.inf, out["mean"])
        p_one = t_sf(t, n - 1) if math.isfinite(t) else (0.0 if t > 0 else 1.0)
        out.update(t=t, p_one=p_one, p_two=min(1.0, 2 * min(p_one, 1 - p_one)))
    if n:
        out["sign_p_one"] = sum(math.comb(n, k) for k in range(out["positive"], n + 1)) / 2 ** n
    return out


def load_windows(results_dir: str, run_id: str, split: str = "val"):
    """A run's per-window mean held-out losses (``bench.token_losses``), or None where the run did not write them."""
    path = os.path.join(results_dir, "windows", f"{run_id}.npz")
    if not os.path.exists(path):
        return None
    import numpy

    with numpy.load(path) as saved:
        return saved[split].astype("float64") if split in saved else None


def paired_window_se(a, b) -> tuple:
    """Mean and standard error of the per-window loss difference a - b of two runs on the same windows."""
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return float("nan"), float("nan")
    d = [x - y for x, y in zip(a, b)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))


def _selection_loss(runs) -> tuple:
    """What picks a method's lr: the held-out select split where every run has it, else (older results) the
    reported validation split, which the report then says."""
    if all("select_loss" in r for r in runs):
        return statistics.mean(r["select_loss"] for r in runs), "select"
    return statistics.mean(r["val_loss"] for r in runs), "val"


def summarize(results: dict) -> dict:
    """Per method: the runs that count (at the lr chosen on the select split), ppl mean/std, and the diagnostics."""
    by_method = {}
    for rec in results.values():
        by_method.setdefault(rec["method"], {}).setdefault(rec["lr"], []).append(rec)
    summary = {}
    for name, by_lr in by_method.items():
        grid = {lr: _mean_std(r["val_ppl"] for r in runs) + (len(runs),) for lr, runs in sorted(by_lr.items())}
        # an lr is chosen among those run at every seed the method has (a sweep on one seed: that seed's runs)
        sweep_seeds = set.intersection(*({r["seed"] for r in runs} for runs in by_lr.values()))
        comparable = {lr: _selection_loss([r for r in runs if r["seed"] in sweep_seeds]) for lr, runs in by_lr.items()}
        best_lr = min(comparable, key=lambda lr: comparable[lr][0]) if sweep_seeds else min(grid, key=lambda lr: grid[lr][0])
        runs = sorted(by_lr[best_lr], key=lambda r: r["seed"])
        mean, std = _mean_std(r["val_ppl"] for r in runs)
        last_overlap = [statistics.mean(r["overlap"][-1][1].values()) for r in runs if r["overlap"]]
        last_rank = [statistics.mean(r["effective_rank"][-1][1].values()) for r in runs if r["effective_rank"]]
        summary[name] = dict(lr=best_lr, grid=grid, runs=runs, ppl=mean, ppl_std=std, n=len(runs),
                             selection={lr: comparable[lr] for lr in sorted(comparable)},
                             selected_on=comparable[best_lr][1] if sweep_seeds else "val",
                             sweep_seeds=sorted(sweep_seeds),
                             overlap=statistics.mean(last_overlap) if last_overlap else None,
                             effective_rank=statistics.mean(last_rank) if last_rank else None,
                             seconds=statistics.mean(r["seconds"] for r in runs),
                             nonfinite=sum(r.get("nonfinite_steps", 0) for r in runs))
    return summary


FULL_RANK = ("AdamW", "AdamW-split")


def full_rank_reference(summary: dict):
    """The name of the best full-rank AdamW configuration present, or None."""
    present = [n for n in FULL_RANK if n in summary]
    return min(present, key=lambda n: summary[n]["ppl"]) if present else None


def closures(summary: dict, results_dir: str | None = None) -> list[dict]:
    rows = []
    reference = full_rank_reference(summary)
    adamw = summary.get(reference) if reference else None
    for base, sara in CLOSURE_PAIRS:
        if adamw is None or base not in summary or sara not in summary:
            continue
        b, s, a = summary[base], summary[sara], adamw
        gap = b["ppl"] - a["ppl"]
        closure = (b["ppl"] - s["ppl"]) / gap if gap != 0 else float("nan")
        # paired by seed (same data order and initial weights): each seed's base, SARA and full-rank runs
        base_runs = {r["seed"]: r for r in b["runs"]}
        adamw_runs = {r["seed"]: r for r in a["runs"]}
        # a seed whose base already beats its full-rank run has no gap: its closure is undefined (NaN), not the
        # ratio of two negatives; the paired test of base against SARA does not need a gap and takes every seed
        seeds, per_seed, seed_gaps, differences, seed_rows = [], [], [], [], []
        for r in s["runs"]:
            if r["seed"] not in base_runs:
                continue
            base_run = base_runs[r["seed"]]
            base_ppl = base_run["val_ppl"]
            reference_ppl = adamw_runs[r["seed"]]["val_ppl"] if r["seed"] in adamw_runs else a["ppl"]
            seeds.append(r["seed"])
            seed_gaps.append(base_ppl - reference_ppl)
            per_seed.append((base_ppl - r["val_ppl"]) / seed_gaps[-1] if seed_gaps[-1] > 0 else float("nan"))
            differences.append(base_run["val_loss"] - r["val_loss"])
            windows = [load_windows(results_dir, run["run_id"]) if results_dir else None for run in (base_run, r)]
            _, diff_se = paired_window_se(*windows)
            reference_run = adamw_runs.get(r["seed"])
            seed_rows.append(dict(seed=r["seed"], base=base_run, sara=r, reference=reference_run,
                                  diff=differences[-1], diff_se=diff_se))
        defined = [c for c in per_seed if c == c]
        rows.append(dict(base=base, sara=sara, reference=reference, ppl_base=b["ppl"], ppl_sara=s["ppl"], ppl_adamw=a["ppl"], gap=gap,
                         closure=closure, per_seed=_mean_std(defined), n=len(defined), seeds=seeds,
                         seed_closures=per_seed, seed_gaps=seed_gaps, test=paired_test(differences), seed_rows=seed_rows,
                         paired_reference=all(sd in adamw_runs for sd in seeds)))
    return rows


def _loss_se(run: dict | None) -> str:
    if run is None:
        return "–"
    if "val_se" not in run:
        return f"{run['val_loss']:.4f}"
    return f"{run['val_loss']:.4f} ± {run['val_se']:.4f}"


def _tokens(runs) -> str:
    counts = sorted({r.get("val_tokens") for r in runs} - {None})
    return ", ".join(f"{c:,}" for c in counts) if counts else "the curve's subset"


def markdown(summary: dict, meta: dict, command: str, results_dir: str | None = None) -> str:
    size = Size(**meta["config"])
    reference = full_rank_reference(summary)
    lines = [
        "# Evidence benchmark: SARA against the rules it is measured with",
        "",
        f"Produced by `{command}` (sara_ds {_version()}, torch {meta.get('torch')}, device {meta.get('device')}).",
        "",
        f"Model: LLaMA-style, {size.layers} layers x hidden {size.hidden} (ffn {size.ffn}), {size.heads} heads, "
        + ("vocabulary 4096, on the bundled Wikipedia + Austen corpus. " if size.data == "prose" else
           f"vocabulary {32000 if size.data == 'code' else 4096}, on the code corpus (sara_bench.code_corpus: Python "
           "sources of pinned packages; networkx held out for validation, mpmath for choosing lrs). ")
        + f"{size.steps} steps of "
        f"{size.batch} x {size.seq_len} tokens ({size.steps * size.batch * size.seq_len / 1e6:.2f}M tokens). "
        f"The curves are evaluated every {size.eval_every} steps on {size.eval_batches} fixed batches "
        f"({size.eval_batches * size.batch * size.seq_len:,} tokens) of the validation split; "
        + ("the reported losses on every window of the validation and select splits"
           + (f" up to {size.final_eval_tokens:,} tokens each" if size.final_eval_tokens else "")
           + " at the end of the run (token counts below), each with its standard error."
           if any("val_se" in r for s in summary.values() for r in s["runs"]) else
           "the reported losses are the last point of that curve (runs written before the end-of-run evaluation)."),
        f"Protocol: cosine schedule, 10% warmup, floor 10% of peak; rank r = hidden/4 = {size.rank}, "
        f"scale alpha = 0.25, subspace refresh every T = {size.update_proj_gap} steps (steps/40); "
        f"betas (0.9, 0.95), no weight decay, gradient clipping 1.0. "
        f"Low-rank methods at lr {size.lowrank_lr} unless swept (below); "
        f"AdamW over lr {', '.join(f'{x:g}' for x in size.adamw_lrs)}.",
        "",
        "## Validation perplexity (mean ± std over seeds)",
        "",
        f"| method | lr | val ppl | vs {reference or 'AdamW'} | last subspace overlap "
        "| eff. rank of ΔW | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    adamw = summary[reference]["ppl"] if reference else None
    for m in METHODS:
        s = summary.get(m.name)
        if s is None:
            continue
        delta = f"{s['ppl'] - adamw:+.2f}" if adamw is not None else "–"
        ov = f"{s['overlap']:.3f}" if s["overlap"] is not None else "–"
        er = f"{s['effective_rank']:.1f}" if s["effective_rank"] is not None else "–"
        bad = f" ({s['nonfinite']} non-finite steps)" if s["nonfinite"] else ""
        lr = f"{s['lr']:g}" + (" (×0.25 on matrices)" if m.name == "AdamW-split" else "")
        lines.append(f"| {m.name} | {lr} | {s['ppl']:.2f} ± {s['ppl_std']:.2f} (n={s['n']}){bad} | {delta} "
                     f"| {ov} | {er} | {s['seconds']:.0f} |")
    lines += ["", "s/run is wall-clock time with runs sharing the machine; it is not a speed benchmark "
              "(see benchmarks/optimizer_step.py for that)."]
    swept = [m.name for m in METHODS if m.name in summary and len(summary[m.name]["grid"]) > 1]
    if swept:
        lines += ["", "## Learning-rate sweeps", "",
                  "Each method's lr is the one with the lowest loss on the *select* split, held out apart from the "
                  "reported validation split (prose: as many windows from the end of the validation text, disjoint "
                  "from the reported ones; code: mpmath), over the seeds every lr of the method ran at. Runs written "
                  "before the select split existed are chosen on the validation split, and marked.", "",
                  "| method | lr | select loss (seeds) | val ppl (all seeds) | chosen |", "|---|---|---|---|---|"]
        for name in swept:
            s = summary[name]
            seeds = ",".join(str(x) for x in s["sweep_seeds"])
            for lr, (m, sd, n) in s["grid"].items():
                loss, split = s["selection"][lr]
                chosen = ("yes" + ("" if s["selected_on"] == "select" else " (on val)")) if lr == s["lr"] else ""
                lines.append(f"| {name} | {lr:g} | {loss:.4f}{'' if split == 'select' else ' (val)'} (s{seeds}) | "
                             f"{m:.2f} ± {sd:.2f} (n={n}) | {chosen} |")
    rows = closures(summary, results_dir)
    if rows:
        lines += ["", "## Gap closure", "",
                  f"closure = (ppl_base − ppl_base+SARA) / (ppl_base − ppl_AdamW), with ppl_AdamW the best full-rank "
                  f"configuration ({rows[0]['reference']}). The per-seed column pairs each seed's base and SARA runs "
                  "against the same seed's full-rank run (its mean where that seed has none) and shows how much of the "
                  "figure is noise. A negative gap (the low-rank base "
                  "already beats full rank) makes closure meaningless; it is marked n/a, overall and per seed (such seeds "
                  "are left out of the per-seed mean, not out of the paired test).", "",
                  "| base | + SARA | ppl base | ppl base+SARA | ppl AdamW | closure | per seed |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            m, sd = r["per_seed"]
            closure = f"{r['closure']:+.1%}" if r["gap"] > 0 else f"n/a (gap {r['gap']:+.2f})"
            per_seed = f"{m:+.1%} ± {sd:.1%} (n={r['n']})" if r["gap"] > 0 and r["n"] else "n/a"
            if r["gap"] > 0 and r["n"] < len(r["seeds"]):
                per_seed += f"; {len(r['seeds']) - r['n']} seed(s) without a gap"
            lines.append(f"| {r['base']} | {r['sara']} | {r['ppl_base']:.2f} | {r['ppl_sara']:.2f} | "
                         f"{r['ppl_adamw']:.2f} | {closure} | {per_seed} |")
        lines += ["", "### Paired by seed", "",
                  "Each seed's base and SARA runs share the data order and initial weights; the full-rank reference is "
                  "the same seed's run where there is one. The tests are on the per-seed difference in validation loss "
                  "(base − SARA; positive: SARA is better): a paired t-test (one-sided p for SARA better, and two-sided) "
                  "and the exact sign test (one-sided).", "",
                  "| base | + SARA | closure per seed | mean ± std | Δ loss mean | t | p one-sided | p two-sided | "
                  "sign test p |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            test = r["test"]
            seeds = ", ".join(f"s{sd}: {c:+.1%}" if c == c else f"s{sd}: n/a (gap {g:+.2f})"
                              for sd, c, g in zip(r["seeds"], r["seed_closures"], r["seed_gaps"]))
            m, sd = r["per_seed"]
            spread = f"{m:+.1%} ± {sd:.1%}" if r["n"] else "n/a"
            lines.append(f"| {r['base']} | {r['sara']} | {seeds} | {spread} | {test['mean']:+.4f} | "
                         f"{test['t']:.2f} | {test['p_one']:.3f} | {test['p_two']:.3f} | "
                         f"{test['sign_p_one']:.3f} ({test['positive']}/{test['n']}) |")
        if any("val_se" in row["base"] for r in rows for row in r["seed_rows"]):
            lines += ["", "### Per seed, with standard errors", "",
                      "Validation loss ± its standard error over the tokens evaluated (the per-token variance divided "
                      "by their count). Δ = base − SARA on the same tokens, ± the standard error of that difference, "
                      "from the per-window differences (windows of one run share nothing with one another but their "
                      "weights; tokens of one window also share their context, so this is the wider of the two); "
                      "z = Δ / SE. |z| below ~2 is not resolved by the held-out set.", ""]
            for r in rows:
                lines += [f"**{r['base']} vs {r['sara']}** (full rank: {r['reference']}; tokens per figure: "
                          f"{_tokens([row['base'] for row in r['seed_rows']])})", "",
                          f"| seed | {r['base']} | {r['sara']} | {r['reference']} | Δ loss ± SE | z |",
                          "|---|---|---|---|---|---|"]
                for row in r["seed_rows"]:
                    z = row["diff"] / row["diff_se"] if row["diff_se"] == row["diff_se"] and row["diff_se"] > 0 else float("nan")
                    se = f" ± {row['diff_se']:.4f}" if row["diff_se"] == row["diff_se"] else ""
                    lines.append(f"| {row['seed']} | {_loss_se(row['base'])} | {_loss_se(row['sara'])} | "
                                 f"{_loss_se(row['reference'])} | {row['diff']:+.4f}{se} | "
                                 + (f"{z:+.1f}" if z == z else "–") + " |")
                lines.append("")
    lines += ["", "## Figures", "", "![validation curves](val_curves.png)", "",
              "![subspace overlap per layer type](overlap.png)", "",
              "![effective rank of the accumulated update](effective_rank.png)", "",
              "*Subspace overlap* is ‖B_oldᵀ B_new‖²_F / r between consecutive bases (1 = the same subspace), "
              "averaged over layers of a type. *Effective rank* is exp(entropy of the normalised singular values) of "
              "W_t − W_0 for the projected matrices (max = min(m, n)).", ""]
    return "\n".join(lines)


def _version() -> str:
    """The optimizers' version (the harness only drives them), without importing torch."""
    from importlib import metadata

    try:
        return metadata.version("sara-ds")
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        import sara_ds

        return sara_ds.__version__


def _curve(runs, key, reducer):
    """Mean over seeds of a per-run [(step, value)] series, where every run has the step."""
    series = {}
    for r in runs:
        for step, value in r[key]:
            series.setdefault(step, []).append(reducer(value))
    steps = sorted(s for s, v in series.items() if len(v) == len(runs))
    return steps, [statistics.mean(series[s]) for s in steps]


def plots(summary: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def panels(key, reducer, ylabel, title, fname, transform=lambda v: v, zoom=False):
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
        lows, highs, last_step = [], [], None
        for ax, names, sub in ((axes[0], ADAMW_PANEL, "AdamW base and the subspace rules"),
                               (axes[1], OTHER_PANEL, "Adafactor and Adam-mini bases")):
            for name in names:
                if name not in summary:
                    continue
                steps, values = _curve(summary[name]["runs"], key, reducer)
                values = [transform(v) for v in values]
                if not steps:
                    continue
                color, style = STYLE.get(name, (None, "-"))
                ax.plot(steps, values, style, color=color, label=name, lw=1.6)
                tail = [v for st, v in zip(steps, values) if st >= 0.4 * steps[-1]]  # where methods separate
                lows.append(min(tail))
                highs.append(max(tail))
                last_step = steps[-1]
            ax.set_title(sub)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel(ylabel)
        if zoom and lows:
            top = sorted(highs)[len(highs) * 3 // 4]  # an outlier method may leave the frame
            pad = 0.05 * (top - min(lows))
            axes[0].set_ylim(min(lows) - pad, top + pad)
            for ax in axes:
                ax.set_xlim(0.4 * last_step, last_step * 1.01)
            title += " (last 60% of training)"
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    panels("val", lambda v: v, "validation perplexity", "Validation perplexity (mean over seeds)", "val_curves.png",
           transform=math.exp, zoom=True)
    panels("effective_rank", lambda v: statistics.mean(v.values()), "effective rank of W_t - W_0",
           "Effective rank of the accumulated update (mean over projected matrices and seeds)", "effective_rank.png")

    fig, grid = plt.subplots(2, 4, figsize=(14, 7), sharey=True)
    axes = list(grid.flat)
    for ax, lt in zip(axes, LAYER_TYPES):
        for name in OVERLAP_METHODS:
            if name not in summary:
                continue
            runs = [r for r in summary[name]["runs"] if r["overlap"]]
            if not runs:
                continue
            steps, values = _curve(runs, "overlap", lambda v, lt=lt: v.get(lt, float("nan")))
            color, style = STYLE.get(name, (None, "-"))
            ax.plot(steps, values, style, color=color, label=name, lw=1.4)
        ax.set_title(lt)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in grid[1]:
        ax.set_xlabel("step")
    for ax in grid[:, 0]:
        ax.set_ylabel("overlap of consecutive subspaces")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    axes[-1].legend(handles, labels, loc="center")
    fig.suptitle("The frozen subspace: dominant (dashed) vs importance-sampled (solid) bases, mean over layers and seeds")
    fig.tight_layout()
    path = os.path.join(out, "overlap.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def write_report(results_dir: str, out: str, command: str) -> list[str]:
    """Table and figures for ``results_dir/results.jsonl``, written into ``out``."""
    os.makedirs(out, exist_ok=True)
    results = load_results(os.path.join(results_dir, "results.jsonl"))
    if not results:
        raise ValueError(f"sara-bench: no finished runs in {results_dir}/results.jsonl to report on")
    with open(os.path.join(results_dir, "meta.json")) as f:
        meta = json.load(f)
    summary = summarize(results)
    command = meta.get("command") or command  # the run's own command, not that of a --report-only rewrite
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(summary, meta, command, results_dir))
    paths = [md_path] + plots(summary, out)
    if os.path.abspath(out) != os.path.abspath(results_dir):
        for name in ("results.jsonl", "meta.json"):
            with open(os.path.join(results_dir, name)) as src, open(os.path.join(out, name), "w") as dst:
                dst.write(src.read())
            paths.append(os.path.join(out, name))
        windows = os.path.join(results_dir, "windows")
        if os.path.isdir(windows):
            import shutil

            shutil.copytree(windows, os.path.join(out, "windows"), dirs_exist_ok=True)
            paths.append(os.path.join(out, "windows"))
    return paths
