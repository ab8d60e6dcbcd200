"""One rank of tensor x data parallelism inside DeepSpeed, Megatron-DeepSpeed style: megatron-core's
ColumnParallelLinear -> RowParallelLinear handed to ``deepspeed.initialize(mpu=MegatronCoreMPU())``
with the optimizer from the config JSON.

Importable without side effects: tests use ``dense_reference`` (one process, full matrices, the
gradient formed the way data parallelism forms it).
"""
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import counting_dist  # noqa: E402
import sara_ds  # noqa: E402
from dense import dense_run  # noqa: E402
from tp_worker import FFN, HIDDEN, master_weights  # noqa: E402
from worker import serve  # noqa: E402

TOKENS = 6  # per data-parallel rank and step


def batch(step, dp_rank, dp):
    g = torch.Generator().manual_seed(700 + step)
    x, y = torch.randn(dp * TOKENS, HIDDEN, generator=g), torch.randn(dp * TOKENS, HIDDEN, generator=g)
    return x[dp_rank * TOKENS:(dp_rank + 1) * TOKENS], y[dp_rank * TOKENS:(dp_rank + 1) * TOKENS]


def _loss(out, gain, y):
    return F.mse_loss(out * gain, y)


def optimizer_block(sc):
    if sc.get("optimizer") == "AdamW":  # the stock peer, through the same harness
        return {"type": "AdamW", "params": {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0, "torch_adam": True}}
    params = dict(lr=0.02, seed=3, preset=sc["preset"], rank=4, update_proj_gap=2, scale=0.5,
                  tp_spectrum=sc.get("mode", "tsqr"))
    if sc["preset"] == "osd":
        params["osd_lr"] = 0.01
    return {"type": sc.get("optimizer", "SaraAdamW"), "params": params}


def dense_reference(sc, dp=2, steps=7, jitter=0.0, noise_seed=5):
    """One process with the full matrices (``dense.dense_run``), per-DP-rank gradients / dp summed in rank order."""
    w1, w2 = (torch.nn.Parameter(w) for w in master_weights(ffn=sc.get("ffn", FFN)))
    gain = torch.nn.Parameter(torch.ones(HIDDEN))
    block = optimizer_block(sc)
    if block["type"] == "AdamW":
        kw = {k: v for k, v in block["params"].items() if k != "torch_adam"}
        opt = torch.optim.AdamW([gain, w1, w2], **kw)
    else:
        kw = dict(block["params"])
        selection = {k: kw.pop(k) for k in ("rank", "update_proj_gap", "scale")}
        opt = sara_ds.OPTIMIZERS[block["type"]]([{"params": [gain]}, dict(params=[w1, w2], **selection)], **kw)

    def loss_of(step, rank, world):
        x, y = batch(step, rank, world)
        return _loss(F.gelu(x @ w1.T) @ w2.T, gain, y)

    dense_run([gain, w1, w2], opt, steps, loss_of, dp, jitter=jitter, noise_seed=noise_seed)
    state = opt.state_bytes() if isinstance(opt, sara_ds.SaraOptimizer) else None
    largest = max((sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
                   for st in opt.state.values()), default=0)
    return {"w1": w1.detach().clone(), "w2": w2.detach().clone(), "gain": gain.detach().clone(),
            "state_bytes": state, "largest_state": largest}


class TwoLayers(torch.nn.Module):
    def __init__(self, tp, ffn=FFN):
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                  perform_initialization=True, sequence_parallel=False,
                                  gradient_accumulation_fusion=False)
        init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
        torch.manual_seed(0)
        self.mlp_in = ColumnParallelLinear(HIDDEN, ffn, config=cfg, init_method=init, bias=False, gather_output=False)
        self.mlp_out = RowParallelLinear(ffn, HIDDEN, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                         skip_bias_add=False)
        self.gain = torch.nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x, y):
        h, _ = self.mlp_in(x)
        out, _ = self.mlp_out(F.gelu(h))
        return _loss(out, self.gain, y)


def count_inside(opt, counter, calls):
    """Count collectives only while the inner optimizer steps (forward/backward TP traffic and
    DeepSpeed's own gradient reduction stay out); ZeRO-1/2 call it once per param group."""
    real_step = opt.step

    def counted(*args, **kwargs):
        calls[-1] += 1
        counter.enabled = True
        try:
            return real_step(*args, **kwargs)
        finally:
            counter.enabled = False

    opt.step = counted


def run(sc, tp, dp, counter):
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sara_ds.integrations.deepspeed import MegatronCoreMPU

    model = TwoLayers(tp, sc.get("ffn", FFN))
    config = {"train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": 1,
              "optimizer": optimizer_block(sc), "zero_optimization": {"stage": sc["stage"]},
              "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise; the oracle does not clip
              "steps_per_print": 10**9}
    mpu = None if sc.get("no_mpu") else MegatronCoreMPU()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mpu)
    dp_rank = parallel_state.get_data_parallel_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_ranks = dist.get_process_group_ranks(tp_group)
    dp_ranks = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
    opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    calls, wire = [], []  # per step: inner step() calls; collectives on the TP and on the DP group
    count_inside(opt, counter, calls)
    for step in range(sc.get("steps", 7)):
        x, y = batch(step, dp_rank, dp)
        counter.clear()
        calls.append(0)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        wire.append({"tp": counter.on(tp_ranks), "dp": counter.on(dp_ranks)})

    def gather(t, dim):
        out = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(out, t.contiguous(), group=tp_group)
        return torch.cat(out, dim=dim)

    result = {"w1": gather(model.mlp_in.weight.detach(), 0), "w2": gather(model.mlp_out.weight.detach(), 1),
              "gain": model.gain.detach().clone()}
    if isinstance(opt, sara_ds.SaraOptimizer):
        from sara_ds.sharding.tensor_parallel import split_axis_of_marked as partition_dim

        result["held"] = [(i, tuple(opt.matrices[i].shape), partition_dim(opt.matrices[i].param))
                          for i, _ in opt.matrix_states()]
        result.update(wire=wire, calls=calls, tp_rank=parallel_state.get_tensor_model_parallel_rank())
        result["bases"] = {i: st["basis"].clone() for i, st in opt.matrix_states()}
        result["counts"] = opt.refresh_counts()
        result["tp_group_size"] = dist.get_world_size(opt.layout.tp_group) if opt.layout.tp_group is not None else 1
        result["state_bytes"] = opt.state_bytes()
        result["tp_bytes"] = opt.tp_bytes_sent()
    del engine
    gc.collect()
    return result


def main(spec_path):
    import json

    import torch.distributed as dist

    counter = []
    tp = json.load(open(spec_path)).get("tp", 2)

    def install():
        counter.append(counting_dist.install())
        counter[0].enabled = False

    serve(spec_path, lambda sc, spec: run(sc, tp, dist.get_world_size() // tp, counter[0]), engine="deepspeed", tp=tp,
          before=install, gather=("bases", "counts", "state_bytes", "tp_bytes", "held", "wire", "calls", "tp_rank"))


if __name__ == "__main__":
    main(sys.argv[1])
