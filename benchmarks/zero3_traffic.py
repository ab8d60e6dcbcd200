"""ZeRO-3: the bytes SARA adds to each rank's traffic per step, whole-matrix ownership against row blocks.

Analytic, from the shapes (no engine). ZeRO-3's own traffic per rank per step is two bf16 all-gathers of the
parameters (forward, backward) and one bf16 reduce-scatter of the gradients: 3 x 2 P (N-1)/N bytes sent.
ZeRO-3 cuts every parameter into N pieces of ceil(numel / N) elements. What SARA adds (fp32, bytes sent):

* **whole-matrix ownership** (``zero3_ownership='whole'``): each projected matrix has one stepper. The other N-1
  holders send it their fp32 gradient pieces, and it sends each the update of its piece back (the holder decays
  its own weight and adds it): 8 (numel - the stepper's piece) bytes per matrix and step.
* **row blocks** (``'rows'``; ``sara_ds.sharding.zero``): a projected matrix with its basis on the
  column side (galore's std side for m >= n: q, k, v, o, gate, up) is stepped by every rank, each the rows that
  start in its piece. Each step only the partial row at the start of a piece moves (8 bytes per element). At a
  refresh each rank gathers its rows (padded to the largest block) to the rank that forms the spectrum, which
  broadcasts the n x r basis back (``zero3_spectrum='gather'``). Matrices with the basis on the row side
  (down_proj, whose R would be an r x n all-reduce every step) and those with fewer rows than ranks stay whole.

* **auto** (the default): row blocks, tallest against r first, until the whole-matrix exchange left is at most 5%
  of ZeRO-3's own traffic, and only as many as keep the state summed over the ranks within AdamW's, each row
  block's basis being on every rank (``auto_choice``); whole matrices for the rest.

``tests/test_deepspeed.py`` checks ``whole_exchange_bytes``, ``row_exchange_bytes`` and
``row_block_refresh_bytes`` against the bytes real stage-3 engines sent, at 2 and 3 ranks. These model the rules
on their own; they do not call sara_ds.

    python benchmarks/zero3_traffic.py                     # LLaMA-7B, r = 1024, T = 200, DP = 8 and 64
"""
import argparse
import math

EXCHANGE_BYTES = 8  # per element a stepper lacks: the fp32 gradient in, the fp32 update out
LLAMA_7B = dict(hidden=4096, intermediate=11008, layers=32, vocab=32000)


def matrices(hidden, intermediate, layers, vocab, kv=None):
    """(rows, cols) of every projected matrix in Hugging Face's order (q, k, v, o, gate, up, down per layer), and the
    total parameter count; ``kv``: the k and v projections' rows under grouped-query attention (default hidden)."""
    kv = kv or hidden
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (intermediate, hidden),
                 (intermediate, hidden), (hidden, intermediate)]
    params = layers * (sum(m * n for m, n in per_layer) + 2 * hidden) + 2 * vocab * hidden + hidden
    return per_layer * layers, params


def basis_on_columns(m, n) -> bool:
    return m >= n  # galore's std side: the basis spans the smaller dimension


def piece_of(numel, dp, rank) -> tuple:
    """[start, end) of the elements ZeRO-3 rank ``rank`` holds."""
    piece = -(-numel // dp)
    return min(numel, rank * piece), min(numel, (rank + 1) * piece)


def rows_per_rank(m, n, dp) -> list:
    """How many rows start in each rank's piece."""
    out = []
    for rank in range(dp):
        start, end = piece_of(m * n, dp, rank)
        out.append(max(0, min(m, -(-end // n)) - min(m, -(-start // n))))  # rows i with start <= i n < end
    return out


def in_row_blocks(shape, dp) -> bool:
    m, n = shape[0], shape[1]
    return basis_on_columns(m, n) and min(rows_per_rank(m, n, dp)) > 0


def whole_exchange_bytes(shape, dp, stepper) -> int:
    """Bytes all ranks send per step for one parameter stepped whole by ``stepper``."""
    numel = math.prod(shape)
    start, end = piece_of(numel, dp, stepper)
    return EXCHANGE_BYTES * (numel - (end - start))


def row_exchange_bytes(shape, dp) -> int:
    """Bytes all ranks send per step for one matrix in row blocks: each piece that starts inside a row sends that
    row's rest in it (its gradient) to the rank stepping the row, and takes its update back."""
    m, n = shape
    total = 0
    for rank in range(1, dp):
        start, end = piece_of(m * n, dp, rank)
        total += max(0, min(end, -(-start // n) * n) - start)
    return EXCHANGE_BYTES * total


def row_block_refresh_bytes(shape, dp, rank) -> int:
    """Bytes all ranks hand to collectives at one refresh of one matrix in row blocks (sara_ds's counters): the
    peak for the scaling check (4 B a rank), each other rank's rows padded to the largest block, the basis."""
    m, n = shape
    return 4 * dp + 4 * (dp - 1) * max(rows_per_rank(m, n, dp)) * n + 4 * n * min(rank, m, n)


def whole_matrix(m, n, dp) -> float:
    """Per rank per step, averaged over the ranks (any stepper: every piece but the last is the same size)."""
    return whole_exchange_bytes((m, n), dp, 0) / dp


def row_blocks(m, n, dp, rank, gap) -> float:
    """Per rank per step, averaged: the partial rows each step; at a refresh the gather (the rows of every rank but
    the root) and the basis broadcast (received once by each other rank)."""
    r = min(rank, m, n)
    refresh = 4 * (dp - 1) * max(rows_per_rank(m, n, dp)) * n + 4 * (dp - 1) * n * r
    return (row_exchange_bytes((m, n), dp) + refresh / gap) / dp


def auto_choice(mats, dp, rank, params=None, itemsize=2, share=0.05) -> list:
    """``zero3_ownership='auto'``: which of ``mats`` go in row blocks. Taken tallest against r first while the
    whole-matrix exchange left is above ``share`` of ZeRO-3's own traffic (``params`` parameters of ``itemsize``
    bytes; default: the matrices alone), and while the state summed over the ranks stays within AdamW's (2 fp32
    elements per weight): a row block adds dp - 1 copies of its n x r basis. (The parameters not projected hold
    Adam's state under both, so they leave the budget as it is.)"""
    params = params or sum(m * n for m, n in mats)
    own = 3 * params * itemsize * (dp - 1) / dp
    left = sum(whole_matrix(m, n, dp) for m, n in mats)
    budget = sum(2 * m * n - state(m, n, rank) for m, n in mats)
    chosen = [False] * len(mats)
    for i in sorted(range(len(mats)), key=lambda i: (-mats[i][0] / min(rank, *mats[i]), i)):
        m, n = mats[i]
        if left <= share * own:
            break
        if not in_row_blocks((m, n), dp):
            continue
        extra = (dp - 1) * n * min(rank, m, n)
        if extra <= budget:
            budget -= extra
            left -= whole_matrix(m, n, dp)
            chosen[i] = True
    return chosen


def state(m, n, rank) -> int:
    """fp32 elements of one projected matrix's AdamW state: the basis and two moments."""
    r = min(rank, m, n)
    return r * (min(m, n) + 2 * max(m, n))


def _rows(mats, dp, rank, mode, params):
    """Which of ``mats`` are stepped in row blocks under ``zero3_ownership=mode``."""
    if mode == "auto":
        return auto_choice(mats, dp, rank, params)
    return [mode == "rows" and in_row_blocks(s, dp) for s in mats]


def hybrid(mats, dp, rank, gap, mode="auto", params=None) -> float:
    """What sara_ds sends for ``mats`` per rank per step under ``zero3_ownership=mode``."""
    rows = _rows(mats, dp, rank, mode, params)
    return sum(row_blocks(m, n, dp, rank, gap) if row else whole_matrix(m, n, dp) for (m, n), row in zip(mats, rows))


def hybrid_state_bytes(mats, dp, rank, mode="auto", params=None) -> float:
    """fp32 state per rank of ``mats`` (AdamW), averaged: a row block's basis is on every rank, its moments cut
    among them; a whole matrix's state is on one rank."""
    rows = _rows(mats, dp, rank, mode, params)
    out = 0.0
    for (m, n), row in zip(mats, rows):
        r = min(rank, m, n)
        d, k = (n, m) if basis_on_columns(m, n) else (m, n)
        out += 4 * (d * r + 2 * r * k / dp) if row else 4 * state(m, n, rank) / dp
    return out


def table(dps, rank, gap, shape=LLAMA_7B) -> str:
    mats, params = matrices(**shape)
    lines = [f"LLaMA-7B ({params / 1e9:.2f}B params, {len(mats)} projected matrices), r = {rank}, T = {gap}: "
             "GB sent per rank per step, and the projected matrices' fp32 state per rank (GiB)",
             f"{'DP':>4} {'ZeRO-3 own':>11} {'mode':>6} {'in rows':>8} {'SARA adds':>10} {'share':>7} {'state':>7} "
             f"{'AdamW':>7}"]
    for dp in dps:
        own = 3 * 2 * params * (dp - 1) / dp
        adam = 8 * sum(m * n for m, n in mats) / dp
        for mode in ("auto", "rows", "whole"):
            rows = _rows(mats, dp, rank, mode, params)
            extra = hybrid(mats, dp, rank, gap, mode, params)
            lines.append(f"{dp:>4} {own / 1e9:>11.2f} {mode:>6} {sum(rows):>8} {extra / 1e9:>10.2f} "
                         f"{extra / own:>7.1%} {hybrid_state_bytes(mats, dp, rank, mode, params) / 2**30:>7.2f} "
                         f"{adam / 2**30:>7.2f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", default="8,64")
    ap.add_argument("--rank", type=int, default=1024)
    ap.add_argument("--gap", type=int, default=200, help="steps between refreshes (update_proj_gap)")
    args = ap.parse_args()
    print(table([int(d) for d in args.dp.split(",")], args.rank, args.gap))


if __name__ == "__main__":
    main()
