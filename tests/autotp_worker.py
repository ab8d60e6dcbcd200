"""One rank of DeepSpeed's own AutoTP training (``"tensor_parallel": {"autotp_size": N}``) on a tiny Hugging Face
Llama, with the optimizer from the config JSON. Importable: tests use ``dense_reference``."""
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sara_ds  # noqa: E402
from dense import dense_run  # noqa: E402
from worker import serve  # noqa: E402

STEPS, MICRO = 6, 2


def build_model(square=False):
    """A tiny Hugging Face Llama. head_dim 16 makes q/k/v/o 64x32 and 32x64; ``square`` (head_dim 8) makes them
    32x32, as in LLaMA, where one process's side for o_proj (right) is AutoTP's split axis."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=8 if square else 16, max_position_embeddings=16)
    return LlamaForCausalLM(cfg)


def tokens(step, dp_rank=0, dp=1):
    t = torch.randint(0, 64, (dp * MICRO, 9), generator=torch.Generator().manual_seed(300 + step))
    return t[dp_rank * MICRO:(dp_rank + 1) * MICRO]


def optimizer_block(sc):
    if sc["optimizer"] == "AdamW":
        return {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0,
                                            "torch_adam": True}}
    params = {"lr": 0.01, "rank": 4, "update_proj_gap": 2, "scale": 0.25, "preset": sc["preset"], "seed": 3}
    if sc["preset"] == "osd":  # the default, 1/update_proj_gap = 0.5 here, turns round-off into sign flips of B
        params["osd_lr"] = 0.01
    return {"type": sc["optimizer"], "params": params}


def dense_reference(sc, dp=1):
    """One process on the full matrices (``dense.dense_run``): {"weights": name -> tensor, "norms": the clipped steps'
    gradient norms}. ``jitter``: every gradient times (1 + jitter * N(0, 1)), to measure how far a rule carries fp32
    round-off (a relative 1e-7 is about one ulp)."""
    model = build_model(sc.get("square", False))
    block = optimizer_block(sc)
    params = dict(block["params"])
    if sc["optimizer"] == "AdamW":
        params.pop("torch_adam")
        opt = torch.optim.AdamW(model.parameters(), **params)
    else:
        selection = {k: params.pop(k) for k in ("rank", "update_proj_gap", "scale")}
        opt = sara_ds.OPTIMIZERS[sc["optimizer"]](sara_ds.param_groups(model, **selection), **params)
    named = list(model.named_parameters())

    def loss_of(step, rank, world):
        t = tokens(step, rank, world)
        return model(input_ids=t[:, :-1], labels=t[:, 1:]).loss

    norms = dense_run([p for _, p in named], opt, sc.get("steps", STEPS), loss_of, dp, jitter=sc.get("jitter", 0.0),
                      noise_seed=sc.get("noise_seed", 5), clip=sc.get("dense_clip"))
    return {"weights": {n: p.detach().clone() for n, p in named}, "norms": norms}


def run(sc, tp, dp):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    from sara_ds.sharding.tensor_parallel import split_axis_of_marked as partition_dim

    model = build_model(sc.get("square", False))
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "optimizer": optimizer_block(sc), "zero_optimization": {"stage": sc["stage"]},
              "gradient_clipping": sc.get("clip", 0.0), "tensor_parallel": {"autotp_size": tp},
              "steps_per_print": 10**9}
    if sc.get("clip", 0.0) is None:  # the key left out, as a user would: DeepSpeed then clips at 1.0
        del config["gradient_clipping"]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    tp_group, dp_rank = groups.get_tensor_model_parallel_group(), groups.get_data_parallel_rank()
    norms = []  # DeepSpeed's global gradient norm, the one it clips with (ZeRO-1/2 keep it)
    for step in range(sc.get("steps", STEPS)):
        t = tokens(step, dp_rank, dp)
        engine.backward(engine(input_ids=t[:, :-1], labels=t[:, 1:]).loss)
        engine.step()
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, p in model.named_parameters():
        w = (safe_get_full_fp32_param(p) if engine.zero_optimization() else p.detach()).clone()
        dim = partition_dim(p)
        if dim is not None:
            parts = [torch.empty_like(w) for _ in range(tp)]
            dist.all_gather(parts, w.contiguous(), group=tp_group)
            w = torch.cat(parts, dim=dim)
        weights[name.replace("module.", "")] = w
    opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    result = {"weights": weights, "norms": norms}
    if isinstance(opt, sara_ds.SaraOptimizer):
        result.update(bases={i: st["basis"].clone() for i, st in opt.matrix_states()}, counts=opt.refresh_counts(),
                      tp_group_size=dist.get_world_size(opt.layout.tp_group) if opt.layout.tp_group is not None else 1,
                      projected=[opt.param_names[i] for i, _ in opt.matrix_states()])
    del engine
    gc.collect()
    return result


def main(spec_path):
    import json

    import torch.distributed as dist

    tp = json.load(open(spec_path)).get("tp", 2)
    serve(spec_path, lambda sc, spec: run(sc, tp, dist.get_world_size() // tp), engine="deepspeed", gather=("bases",))


if __name__ == "__main__":
    main(sys.argv[1])
