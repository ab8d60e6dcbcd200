"""Bytes sent per subspace refresh under tensor parallelism, per Megatron weight, vs all-gathering the gradient.

Analytic (``sara_ds.sharding.tensor_parallel.refresh_bytes``, checked against bytes counted in real gloo
collectives by tests/test_tp_math.py). Per TP rank, per refresh of one matrix: the payload a rank puts into
collectives, plus the ring-algorithm wire traffic ((t-1)/t * 2 * size for all-reduce, (t-1) * shard for
all-gather). Between refreshes a basis on the unsharded axis sends nothing; one on the split axis (the default
tp_side='same' puts a square row-parallel weight's there, e.g. linear_proj) also all-reduces R = B^T A, r x n
elements, every step, and its refresh gathers the matrix: this script counts refreshes only, as tp_side='unsplit'
places the bases.

    python benchmarks/tp_comm.py --tp 8
"""
import argparse

from sara_ds.sharding.tensor_parallel import refresh_bytes

MODELS = {  # hidden, ffn, heads, kv heads (Megatron fused layouts: qkv, proj, fc1 = SwiGLU [gate; up], fc2)
    "LLaMA-7B": (4096, 11008, 32, 32),
    "LLaMA-70B": (8192, 28672, 64, 8),
}


def weights(hidden, ffn, heads, kv):
    head = hidden // heads
    return [("linear_qkv", hidden + 2 * kv * head, hidden, 0), ("linear_proj", hidden, hidden, 1),
            ("linear_fc1", 2 * ffn, hidden, 0), ("linear_fc2", hidden, ffn, 1)]


def wire(method, payload, tp):
    # all-gather methods move (t-1) shards to each rank; all-reduce methods move 2 (t-1)/t of the buffer
    return payload * (tp - 1) if method in ("tsqr", "gather") else payload * 2 * (tp - 1) / tp


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--bf16_gather", action="store_true", help="count the all-gather baseline in bf16")
    args = ap.parse_args()
    mib = 2**20
    for model, dims in MODELS.items():
        print(f"== {model}, TP={args.tp}, r={args.rank} (per TP rank, per refresh; MiB)")
        print(f"   {'weight (full shape, sharded dim)':<38}{'gather grad':>12}{'tsqr':>10}{'gram':>10}{'sketch':>10}"
              f"{'wire: gather':>14}{'tsqr':>9}{'gram':>9}{'sketch':>9}")
        for name, rows, cols, pd in weights(*dims):
            # A_i = local block oriented so the basis side (unsharded) has n columns
            n, local_rows = (cols, rows // args.tp) if pd == 0 else (rows, cols // args.tp)
            pay = {m: refresh_bytes(m, local_rows, n, args.rank, itemsize=2 if (m == "gather" and args.bf16_gather) else 4)
                   for m in ("gather", "tsqr", "gram", "sketch")}
            w = {m: wire(m, pay[m], args.tp) for m in pay}
            print(f"   {name + f' {rows}x{cols} pd={pd}':<38}" + "".join(f"{pay[m]/mib:>10.1f}  " if m == "gather" else f"{pay[m]/mib:>10.1f}" for m in pay)
                  + f"{w['gather']/mib:>14.1f}" + "".join(f"{w[m]/mib:>9.1f}" for m in ("tsqr", "gram", "sketch")))
        print()


if __name__ == "__main__":
    main()
