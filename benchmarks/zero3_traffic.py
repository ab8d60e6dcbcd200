"""ZeRO-3: the bytes SARA adds to each rank's traffic per step, for the two designs #14 weighed, at LLaMA-7B.

Analytic, from the shapes (no engine). ZeRO-3's own traffic per rank per step is two bf16 all-gathers of the
parameters (forward, backward) and one bf16 reduce-scatter of the gradients: 3 x 2 P (N-1)/N bytes sent.
What SARA adds (fp32, bytes sent per rank, averaged over ranks):

* **whole-matrix ownership** (shipped, ``sara_ds.sharding.zero``): each projected matrix has one stepper. The other
  N-1 holders send it their fp32 gradient and weight pieces, and it sends each its new weight piece back:
  12 (numel - the stepper's piece) bytes per matrix and step, over N ranks. ``tests/test_deepspeed.py`` checks this
  count against the bytes real stage-3 engines sent.
* **row blocks** (not built): a ZeRO-3 partition of a row-major matrix is a block of rows. With the basis on the
  column side (galore's std side for m >= n: q, k, v, o, gate, up) projection, moments and back-projection are
  row-local, and only a refresh communicates (TSQR: an all-gather of min(rows_i, n) x n R factors, then the
  n x r basis broadcast), amortised over the T steps between refreshes. With the basis on the row side
  (down_proj, 4096 x 11008) R = sum_i B_i^T A_i is an r x n all-reduce every step: 2 r n (N-1)/N x 4 bytes.
* **hybrid** (not built): row blocks for the column-basis matrices, whole-matrix ownership for the rest.

    python benchmarks/zero3_traffic.py                     # LLaMA-7B, r = 1024, T = 200, DP = 8 and 64
"""
import argparse

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


def whole_matrix(m, n, dp) -> float:
    piece = -(-m * n // dp)
    return 12 * (m * n - piece) / dp


def row_blocks(m, n, dp, rank, gap) -> float:
    r = min(rank, m, n)
    if basis_on_columns(m, n):
        rows = -(-m // dp)
        refresh = 4 * (dp - 1) * min(rows, n) * n + 4 * n * r / dp  # all-gather R factors; the basis broadcast
        return refresh / gap
    cols_side = n  # R is r x n, summed over the row blocks
    return 4 * 2 * r * cols_side * (dp - 1) / dp


def table(dps, rank, gap, shape=LLAMA_7B) -> str:
    mats, params = matrices(**shape)
    lines = [f"LLaMA-7B ({params / 1e9:.2f}B params, {len(mats)} projected matrices), r = {rank}, T = {gap}: "
             "GB sent per rank per step",
             f"{'DP':>4} {'ZeRO-3 own':>11} {'whole-matrix':>13} {'row blocks':>11} {'hybrid':>8}   "
             "(SARA's share of ZeRO-3's own)"]
    for dp in dps:
        own = 3 * 2 * params * (dp - 1) / dp
        whole = sum(whole_matrix(m, n, dp) for m, n in mats)
        rows = sum(row_blocks(m, n, dp, rank, gap) for m, n in mats)
        hybrid = sum(row_blocks(m, n, dp, rank, gap) if basis_on_columns(m, n) else whole_matrix(m, n, dp)
                     for m, n in mats)
        lines.append(f"{dp:>4} {own / 1e9:>11.2f} {whole / 1e9:>13.2f} {rows / 1e9:>11.2f} {hybrid / 1e9:>8.2f}   "
                     f"({whole / own:.1%} / {rows / own:.1%} / {hybrid / own:.1%})")
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
