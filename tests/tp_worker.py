"""One rank of a tensor-parallel test on megatron-core's own ColumnParallelLinear / RowParallelLinear.

Importable without side effects: tests use ``dense_reference`` (the same training on one
process with plain tensors) and ``TOKENS``.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import counting_dist  # noqa: E402
import sara_ds  # noqa: E402
from dense import dense_run  # noqa: E402
from worker import serve  # noqa: E402

HIDDEN, FFN, TOKENS = 16, 48, 6   # gradients have rank <= 6 tokens, so the sampled spectrum is well separated


def batch(step):
    g = torch.Generator().manual_seed(900 + step)
    return torch.randn(TOKENS, HIDDEN, generator=g), torch.randn(TOKENS, HIDDEN, generator=g)


def master_weights(seed=0, blocks=1, ffn=FFN):
    """What megatron's CPU initialisation draws for the layers (column, row per block), before splitting. ``ffn``:
    the column-parallel layer's width (HIDDEN: square matrices, whose basis goes on the split axis of one of them)."""
    torch.manual_seed(seed)
    weights = []
    for _ in range(blocks):
        for shape in ((ffn, HIDDEN), (HIDDEN, ffn)):
            w = torch.empty(shape)
            torch.nn.init.normal_(w, std=0.2)
            weights.append(w)
    return weights


def _forward(x, weights):
    """``blocks`` column-parallel -> GELU -> row-parallel blocks, one after another (dense form)."""
    for w1, w2 in zip(weights[::2], weights[1::2]):
        x = F.gelu(x @ w1.T) @ w2.T
    return x


def _groups(params, sc):
    return [dict(params=params, rank=sc.get("rank", 4), update_proj_gap=2, scale=0.5)]


def _opt_kwargs(sc):
    kw = dict(lr=0.02, seed=3, preset=sc["preset"], tp_spectrum=sc.get("mode", "tsqr"), foreach=sc.get("foreach"),
              finite_flag=sc.get("finite_flag"), tp_side=sc.get("tp_side", "same"))
    if sc["preset"] == "osd":
        kw["osd_lr"] = 0.01
    return kw


def dense_reference(sc, steps=7):
    weights = [torch.nn.Parameter(w) for w in master_weights(blocks=sc.get("blocks", 1), ffn=sc.get("ffn", FFN))]
    opt = sara_ds.OPTIMIZERS[sc.get("optimizer", "SaraAdamW")](_groups(weights, sc), **_opt_kwargs(sc))

    def loss_of(step, rank, world):
        x, y = batch(step)
        return F.mse_loss(_forward(x, weights), y)

    def poison(step, params):  # the device flag skips that step too, but counts it
        if step == sc.get("nan_step"):
            params[0].grad[0, 0] = float("nan")

    host_skips = sc.get("nan_step") if sc.get("finite_flag") != "device" else None  # as if it never happened
    dense_run(weights, opt, steps, loss_of, skip=() if host_skips is None else (host_skips,), poison=poison)
    return {f"w{i + 1}": w.detach().clone() for i, w in enumerate(weights)}


def run(sc, counter, steps=7):
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=True,
                              sequence_parallel=False, gradient_accumulation_fusion=False)
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    torch.manual_seed(0)
    layers = []
    for _ in range(sc.get("blocks", 1)):
        layers.append(ColumnParallelLinear(HIDDEN, sc.get("ffn", FFN), config=cfg, init_method=init, bias=False,
                                           gather_output=False))
        layers.append(RowParallelLinear(sc.get("ffn", FFN), HIDDEN, config=cfg, init_method=init, bias=False,
                                        input_is_parallel=True, skip_bias_add=False))
    col = layers[0]
    group = parallel_state.get_tensor_model_parallel_group()
    opt = sara_ds.OPTIMIZERS[sc.get("optimizer", "SaraAdamW")](_groups([layer.weight for layer in layers], sc),
                                                              tp_group=group, **_opt_kwargs(sc))
    step_wire = []  # per step: the collectives opt.step() made, counted by tests/counting_dist.py
    step_reads = []  # per step: the values opt.step() read back to the host
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        out = x
        for column, row in zip(layers[::2], layers[1::2]):
            h, _ = column(out)
            out, _ = row(F.gelu(h))
        F.mse_loss(out, y).backward()
        if step == sc.get("nan_step") and dist.get_rank(group) == tp - 1:
            col.weight.grad[0, 0] = float("nan")  # on one TP rank's shard only
        counter.clear()
        with counting_dist.HostReads() as host:
            opt.step()
        step_wire.append([(op, nbytes) for op, _, nbytes in counter.records])
        step_reads.append(host.count)
    # all-gather the shards back into full matrices (columns: rows split; rows: columns split)
    weights = {f"w{i + 1}": torch.cat(_gather(layer.weight.detach(), group), dim=i % 2)
               for i, layer in enumerate(layers)}
    bases = {i: st["basis"].clone() for i, st in opt.matrix_states()}
    sent = opt.tp_bytes_sent()
    assert not any(k.startswith("_sara") for k in col.weight.__dict__), "optimizer bookkeeping leaked onto a parameter"
    return {**weights, "bases": bases, "bytes_sent": sent, "counts": opt.refresh_counts(), "step_wire": step_wire,
            "step_reads": step_reads, "banks": sum(size > 1 for size in opt.banks.sizes())}


def _gather(t, group):
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(out, t.contiguous(), group=group)
    return out


def main(spec_path):
    counter = []
    serve(spec_path, lambda sc, spec: run(sc, counter[0], sc.get("steps", 7)), tp="world",
          before=lambda: counter.append(counting_dist.install()), gather=("bases", "bytes_sent"))


if __name__ == "__main__":
    main(sys.argv[1])
