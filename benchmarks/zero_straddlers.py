"""ZeRO-1/2 straddlers at LLaMA-7B: how much refresh and update work is done twice, from DeepSpeed's partition map.

Under ZeRO-1/2 DeepSpeed flattens each param group (in order, no per-parameter padding by default; the whole
padded to a multiple of 2 x DP) and cuts it into DP equal partitions (``stage_1_and_2.py``:
``get_data_parallel_partitions``, ``get_partition_info``). A projected matrix that crosses a boundary is a
straddler: sara_ds reassembles it and runs its refresh and its projected update on every rank holding a piece,
so its work was done once per holder. Since then each such straddler has one stepper (the least-loaded of its
holders by refresh cost, ``sara_ds.sharding.ownership.assign_among``), which the other holders send their pieces
to. This counts the work both ways analytically (no engine):

  * refresh cost of an m x n matrix: max(m, n) * min(m, n)^2 (the SVD);
  * ordinary update cost: m * n * r (the projection and the back-projection are two m x n x r products);
  * redundant work = sum over straddlers of (holders - 1) x cost, as a share of the total;
  * the busiest rank's work against the mean (what the step waits for).

tests/test_deepspeed.py checks ``holders`` and ``steppers`` against the matrices each rank of a real ZeRO-1/2
engine steps.

    python benchmarks/zero_straddlers.py                 # LLaMA-7B, DP = 8, 16, 32, 64
    python benchmarks/zero_straddlers.py --dp 8,64 --rank 512
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sara_ds.sharding.ownership import assign_among, refresh_cost  # noqa: E402


def holders(numels, dp: int) -> list:
    """For each parameter of one flattened param group (in order), the DP ranks whose partition holds a piece."""
    total = sum(numels)
    alignment = 2 * dp  # nccl_start_alignment_factor x DP
    partition = -(-total // alignment) * alignment // dp
    out, start = [], 0
    for n in numels:
        end = start + n
        out.append(list(range(start // partition, (end - 1) // partition + 1)) if n else [])
        start = end
    return out


def pieces(numels, dp: int) -> list:
    """For each parameter of one flattened param group, {DP rank: how many of its elements that rank's partition
    holds}, cut as ``holders`` cuts it."""
    total = sum(numels)
    alignment = 2 * dp
    partition = -(-total // alignment) * alignment // dp
    out, start = [], 0
    for n in numels:
        end = start + n
        out.append({k: min(end, (k + 1) * partition) - max(start, k * partition)
                    for k in (range(start // partition, (end - 1) // partition + 1) if n else ())})
        start = end
    return out


def exchange_bytes(shapes, dp: int) -> int:
    """Bytes the straddlers' exchange sends per step, all ranks together: every holder that does not step a
    straddler sends the stepper its fp32 gradient piece and takes the update of its piece back (it decays its own
    weight and adds it), 8 bytes per element the stepper does not hold."""
    numels = [s[0] * s[1] for s in shapes]
    return sum(8 * (n - own[k]) for n, own, k in zip(numels, pieces(numels, dp), steppers(shapes, dp))
               if len(own) > 1)


def steppers(shapes, dp: int) -> list:
    """The DP rank that steps each matrix of one param group: its holder, or for a straddler the one sara_ds picks."""
    held = holders([s[0] * s[1] for s in shapes], dp)
    loads = [0] * dp
    for ranks, shape in zip(held, shapes):
        if len(ranks) == 1:
            loads[ranks[0]] += refresh_cost(shape)
    chosen = assign_among([(i, ranks, refresh_cost(shapes[i])) for i, ranks in enumerate(held) if len(ranks) > 1],
                          loads)
    return [chosen.get(i, ranks[0]) for i, ranks in enumerate(held)]


def llama_matrices(hidden=4096, ffn=11008, layers=32):
    """The projected matrices of a LLaMA in Hugging Face's parameter order: q, k, v, o, gate, up, down per layer."""
    block = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn)]
    return block * layers


def straddler_cost(shapes, dp: int, rank: int) -> dict:
    refresh = [max(s) * min(s) ** 2 for s in shapes]
    update = [s[0] * s[1] * rank for s in shapes]
    held = holders([s[0] * s[1] for s in shapes], dp)
    per_rank_refresh, per_rank_update = [0] * dp, [0] * dp
    for ranks, r, u in zip(held, refresh, update):
        for k in ranks:
            per_rank_refresh[k] += r
            per_rank_update[k] += u
    straddlers = [ranks for ranks in held if len(ranks) > 1]
    one_refresh, one_update = [0] * dp, [0] * dp
    for k, r, u in zip(steppers(shapes, dp), refresh, update):
        one_refresh[k] += r
        one_update[k] += u
    return dict(dp=dp, matrices=len(shapes), straddlers=len(straddlers), exchange=exchange_bytes(shapes, dp) / dp,
                stepper_refresh=max(one_refresh) / (sum(refresh) / dp),
                stepper_update=max(one_update) / (sum(update) / dp),
                extra_refresh=sum((len(h) - 1) * r for h, r in zip(held, refresh)) / sum(refresh),
                extra_update=sum((len(h) - 1) * u for h, u in zip(held, update)) / sum(update),
                busiest_refresh=max(per_rank_refresh) / (sum(refresh) / dp),
                busiest_update=max(per_rank_update) / (sum(update) / dp))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", default="8,16,32,64")
    ap.add_argument("--rank", type=int, default=1024, help="projection rank (LLaMA-7B: hidden/4)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    shapes = llama_matrices(args.hidden, args.ffn, args.layers)
    print(f"LLaMA hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers: {len(shapes)} projected matrices in one "
          f"param group, r = {args.rank}; ZeRO-1/2 partitions as DeepSpeed cuts them\n")
    print("every holder steps a straddler (before) | one stepper per straddler (now: no redundant work), and the "
          "bytes its exchange sends per rank per step against ZeRO-2's own (bf16 gradient reduce-scatter and "
          "parameter all-gather of the projected matrices, ring algorithm)")
    print(f"{'DP':>4}{'straddlers':>12}{'redundant refresh':>19}{'redundant update':>18}"
          f"{'busiest rank: refresh':>23}{'update':>8} |{'busiest rank: refresh':>23}{'update':>8}"
          f"{'exchange MB':>13}{'of ZeRO-2':>10}   (busiest: its work over the mean rank's)")
    for dp in (int(x) for x in args.dp.split(",")):
        c = straddler_cost(shapes, dp, args.rank)
        own = 2 * 2 * sum(m * n for m, n in shapes) * (dp - 1) / dp
        print(f"{dp:>4}{c['straddlers']:>12}{c['extra_refresh']:>18.1%}{c['extra_update']:>18.1%}"
              f"{c['busiest_refresh']:>22.2f}x{c['busiest_update']:>7.2f}x |"
              f"{c['stepper_refresh']:>22.2f}x{c['stepper_update']:>7.2f}x"
              f"{c['exchange'] / 1e6:>13.1f}{c['exchange'] / own:>10.2%}")


if __name__ == "__main__":
    main()
