"""Bytes each rank sends per ordinary step, and memory per GPU, stock Adam against SARA, at LLaMA-7B and 70B.

Analytic, from the shapes (no engine), ring algorithm, bf16 weights and gradients, fp32 masters and state:

* **ZeRO-2** (DP ranks): the engine reduce-scatters the bf16 gradients and all-gathers the bf16 parameters,
  4 P (N-1)/N bytes. SARA adds its straddlers' exchange (``zero_straddlers.exchange_bytes``: 8 bytes per
  element a straddler's stepper does not hold), averaged over the ranks.
* **ZeRO-3**: the engine all-gathers the parameters twice and reduce-scatters the gradients, 6 P (N-1)/N.
  SARA adds the row blocks' partial rows each step and their refreshes' gather and basis broadcast every T steps,
  and the whole-matrix exchange of the matrices stepped whole (``zero3_traffic.hybrid``), for each
  ``zero3_ownership``: 'auto' (the default: row blocks where the exchange would exceed 5% of ZeRO-3's own traffic, while the
  optimizer state stays within AdamW's), 'rows' and
  'whole'. A row block's basis is on every rank (``zero3_traffic.hybrid_state_bytes``).
* **FSDP2** (``fully_shard``, resharding after forward): like ZeRO-3, two all-gathers of the parameters and a
  reduce-scatter of the gradients, 6 P (N-1)/N. SARA's FSDP2 layout steps each projected matrix whole on an
  owner: the other N-1 ranks send it their fp32 gradient rows (padded to torch.chunk's ceil(m/N)) and take the
  update of their rows back (``fsdp2_exchange_bytes``), averaged over the ranks; the state is on the owner alone.
* **Megatron, TP = 8** (P_t: the parameters of one TP rank): Adam with its distributed optimizer
  reduce-scatters the gradients and all-gathers the parameters, 4 P_t (N-1)/N. SARA's distributed optimizer
  all-reduces the gradients instead, 6 P_t (N-1)/N, or, over shard-aligned buffers (megatron-core >= 0.19), sends
  what Adam sends plus the padding that keeps every parameter whole in one shard. With the basis on the split
  axis (tp_side='same', the default: the row-parallel ``linear_proj``) SARA also all-reduces R (h x r, fp32) over
  TP every step for the matrices a rank owns.

Which counted bytes check each model (real runs on CPU at 2 and 3 ranks):

* ZeRO-2's straddler exchange: tests/test_deepspeed.py::test_zero_equals_single_process_for_every_rule;
* ZeRO-3's whole-matrix exchange, the row blocks' exchange and their refreshes' collectives:
  tests/test_deepspeed.py::test_zero3_equals_single_process_for_every_rule_and_base;
* FSDP2's gather to the owners and the updates sent back: tests/test_fsdp2.py (2 and 3 ranks, the 2 x 2 meshes);
* Megatron's gradient and parameter traffic: tests/test_megatron_traffic.py (the counted bytes of each
  collective equal the ring algorithm's count for that run's buffer); the TP sums: the ``all_reduce@tp`` column
  of benchmarks/megatron_memory.py at TP 2 x DP 2 (131072 B = 4 layers x 4 h r / DP at hidden 256, r 64).

The engines' own figures (stock Adam's columns) are the ring algorithm's count and are not measured here.

    python benchmarks/traffic.py                # LLaMA-7B and 70B, DP 8 and 64
"""
import argparse
import math
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]
from megatron_memory import llama_matrices, per_gpu_bytes  # noqa: E402
from zero3_traffic import hybrid, hybrid_state_bytes, matrices, state  # noqa: E402
from zero_straddlers import exchange_bytes  # noqa: E402

MODELS = {"LLaMA-7B": dict(h=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000, r=1024),
          "LLaMA-70B": dict(h=8192, ffn=28672, layers=80, heads=64, kv_heads=8, vocab=32000, r=2048)}
TP = 8
GAP = 200  # steps between refreshes


def whole_model(cfg):
    """(projected (rows, cols) in parameter order, every parameter's count) at TP = 1, Hugging Face's layout."""
    return matrices(cfg["h"], cfg["ffn"], cfg["layers"], cfg["vocab"], kv=cfg["kv_heads"] * cfg["h"] // cfg["heads"])


def sara_state(projected, params, r):
    """SARA's fp32 state: r (min + 2 max) per projected matrix (basis and moments), Adam's 8 B for the rest."""
    low_rank = sum(4 * state(m, n, r) for m, n in projected)
    return low_rank + 8 * (params - sum(m * n for m, n in projected))


def sharded_memory(cfg, dp, mode=None):
    """Bytes per GPU with the weights, fp32 masters, gradients and state all cut N ways (ZeRO-3, FSDP2): stock
    Adam's (``mode`` None), or SARA's, its projected matrices' state laid out as ``zero3_ownership=mode``."""
    projected, p = whole_model(cfg)
    if mode is None:
        return 16 * p / dp
    others = p - sum(m * n for m, n in projected)
    return (8 * p + 8 * others) / dp + hybrid_state_bytes(projected, dp, cfg["r"], mode, p)


def zero_rows(cfg, dp):
    projected, p = whole_model(cfg)
    r = cfg["r"]
    zero2_memory = {name: 2 * p + (2 * p + 4 * p + s) / dp
                    for name, s in (("Adam", 8 * p), ("SARA", sara_state(projected, p, r)))}
    zero2, zero3 = 4 * p * (dp - 1) / dp, 6 * p * (dp - 1) / dp
    rows = [("ZeRO-2", f"{dp}", zero2, zero2 + exchange_bytes(projected, dp) / dp, zero2_memory["Adam"],
             zero2_memory["SARA"])]
    for mode, label in (("auto", "ZeRO-3, auto (default)"), ("rows", "ZeRO-3, row blocks"),
                        ("whole", "ZeRO-3, whole matrices")):
        rows.append((label, f"{dp}", zero3, zero3 + hybrid(projected, dp, r, GAP, mode, p), sharded_memory(cfg, dp),
                     sharded_memory(cfg, dp, mode)))
    return rows


def fsdp2_exchange_bytes(shapes, dp: int, itemsize: int = 4) -> int:
    """Bytes all ranks send per step for the matrices the FSDP2 layout steps whole (shapes: each one's, or its TP
    shard's): each of the other dp - 1 ranks sends the owner its gradient rows, padded to ceil(m/dp), and the owner
    sends it the update of its rows back."""
    return sum(2 * itemsize * (dp - 1) * -(-s[0] // dp) * math.prod(s[1:]) for s in shapes)


def fsdp2_rows(cfg, dp):
    """FSDP2 holds what ZeRO-3 holds; its layout steps every projected matrix whole, on one owner."""
    projected, p = whole_model(cfg)
    own = 6 * p * (dp - 1) / dp
    return [("FSDP2, matrices on owners", f"{dp}", own, own + fsdp2_exchange_bytes(projected, dp) / dp,
             sharded_memory(cfg, dp), sharded_memory(cfg, dp, "whole"))]


def megatron_rows(cfg, dp, padding=None):
    r = cfg["r"]
    model = {k: v for k, v in cfg.items() if k != "r"}
    mats = llama_matrices(**model, tp=TP)
    p_t = sum(m * n for m, n, _, _ in mats)
    adam = 4 * p_t * (dp - 1) / dp
    tp_sums = cfg["layers"] * 2 * (TP - 1) / TP * 4 * cfg["h"] * r / dp  # linear_proj's R, by its owner
    adam_memory = per_gpu_bytes(mats, r, dp, "Adam", True)[0]
    sara_memory = per_gpu_bytes(mats, r, dp, "SARA", True)[0]
    rows = [("Megatron DistOpt, all-reduced", f"{TP}x{dp}", adam, 6 * p_t * (dp - 1) / dp + tp_sums, adam_memory,
             sara_memory)]
    aligned = None if padding is None else adam * (1 + padding) + tp_sums
    rows.append(("Megatron DistOpt, shard-aligned", f"{TP}x{dp}", adam, aligned, adam_memory, sara_memory))
    return rows


def shard_aligned_padding(cfg, dp):
    """Padding of megatron-core's shard-aligned layout over the TP-local parameters, as a fraction of Megatron's
    flat layout's buffer (one bucket, no overlapped reduction); None without megatron-core >= 0.19."""
    warnings.simplefilter("ignore")  # megatron-core's import-time notices (no Transformer Engine, no rank)
    try:
        import torch
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

        from sara_ds.integrations.megatron_distributed import supports_shard_aligned_buffers
    except ImportError:
        return None
    if not supports_shard_aligned_buffers():
        return None
    model = {k: v for k, v in cfg.items() if k != "r"}
    shapes = [(m, n) if n > 1 else (m,) for m, n, _, _ in llama_matrices(**model, tp=TP)]
    params = [torch.nn.Parameter(torch.empty(s, device="meta", dtype=torch.bfloat16)) for s in shapes]
    config = DistributedDataParallelConfig(use_distributed_optimizer=True)
    sizes = []
    for compute in (LayerWiseDistributedOptimizer.compute_full_param_layout, DistributedOptimizer.compute_full_param_layout):
        for p in params:
            p.is_managed_by_layer_wise_optimizer = compute is LayerWiseDistributedOptimizer.compute_full_param_layout
        layout = compute(params, None, dp, config)
        sizes.append(sum(end - start for lay in layout.layouts.values() for start, end in lay.bucket_indices))
    return sizes[0] / sizes[1] - 1


def table(dps=(8, 64)) -> str:
    lines = ["Bytes each rank sends per ordinary step (GB, ring algorithm) and memory per GPU (GiB: bf16 weights and "
             "gradients, fp32 masters, optimizer state), stock Adam against SARA (r = hidden/4, T = 200)",
             f"{'model':<10} {'mode':<32} {'DP':>6} {'Adam GB':>9} {'SARA GB':>9} {'SARA/Adam':>10} "
             f"{'Adam GiB':>9} {'SARA GiB':>9} {'SARA/Adam':>10}"]
    for label, cfg in MODELS.items():
        for dp in dps:
            padding = shard_aligned_padding(cfg, dp)
            rows = zero_rows(cfg, dp) + fsdp2_rows(cfg, dp) + megatron_rows(cfg, dp, padding)
            for mode, where, adam, sara, adam_mem, sara_mem in rows:
                traffic = (f"{'-':>9} {'-':>10}" if sara is None  # megatron-core < 0.19 cannot lay the buffers out
                           else f"{sara / 1e9:>9.2f} {sara / adam:>9.3f}x")
                lines.append(f"{label:<10} {mode:<32} {where:>6} {adam / 1e9:>9.2f} {traffic} "
                             f"{adam_mem / 2**30:>9.2f} {sara_mem / 2**30:>9.2f} {sara_mem / adam_mem:>9.3f}x")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", default="8,64")
    args = ap.parse_args()
    print(table([int(d) for d in args.dp.split(",")]))


if __name__ == "__main__":
    main()
