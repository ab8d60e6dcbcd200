#!/usr/bin/env bash
# The long CPU evidence (docs/evidence.md): 1500 steps of the cpu size, 3 seeds of AdamW-split, GaLore,
# SARA-GaLore, Fira and SARA-Fira, with an lr sweep of GaLore and SARA-GaLore at seed 0 chosen on the
# held-out select split (0.005, 0.01, 0.02 and 0.04, so that the grid brackets the choice).
# Results go to docs/bench/long3/ (results.jsonl is committed as it grows); rerunning this script skips finished
# runs and resumes unfinished ones from their checkpoints, so it can be stopped (Ctrl-C, SIGTERM) and continued.
#
#   bash scripts/long_evidence.sh            # 21 runs of 1500 steps, two at a time
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench/long3}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
BENCH=("$PY" -m sara_bench --size cpu --steps 1500 --out "$OUT" --docs "$OUT")
export PYTHONPATH=$PWD:$PWD/harness${PYTHONPATH:+:$PYTHONPATH}
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824

# 1. the sweep, seed 0 (8 runs)
"${BENCH[@]}" --methods GaLore,SARA-GaLore --lrs 0.005,0.01,0.02,0.04 --seeds 0
# 2. the full-rank reference and seeds 1 and 2 of each at the lr the select split chose, seed by seed, so that
#    a stopped campaign leaves whole seeds (7 runs)
chosen=$("$PY" -c "
from sara_bench import records, report
s = report.summarize(records.load_results('$OUT/results.jsonl'))
print(','.join(f'{m}={s[m][\"lr\"]}' for m in ('GaLore', 'SARA-GaLore')))")
echo "[long evidence] chosen on the select split at seed 0: $chosen"
"${BENCH[@]}" --methods AdamW-split,GaLore,SARA-GaLore --lrs "$chosen" --seeds 0,1,2
# 3. the Fira pair at the protocol's lr, 3 seeds (6 runs)
"${BENCH[@]}" --methods Fira,SARA-Fira --seeds 0,1,2
