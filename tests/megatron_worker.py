"""One rank: a tiny megatron-core GPTModel trained with get_sara_megatron_optimizer (CPU, gloo).

Megatron's DDP and optimizer wrappers hard-code CUDA devices; the shims that move them to
the CPU live here, in the tests, and nowhere in the package.
"""
import io
import json
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from worker import serve  # noqa: E402


class CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is not None and str(kwargs["device"]).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class Stream:
    def wait_stream(self, *a):
        pass

    def synchronize(self):
        pass


def install_cpu_shims():
    import contextlib

    torch.cuda.current_device = lambda: torch.device("cpu")
    # megatron-core >= 0.17 syncs gradients on the current CUDA stream
    torch.cuda.current_stream = lambda *a, **k: Stream()
    torch.cuda.Stream = lambda *a, **k: Stream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None  # dist_checkpointing syncs before writing
    torch.Tensor.cuda = lambda self, *a, **k: self
    cpu_type = torch.Tensor.type

    def type_as_cuda(self, *a, **k):  # Megatron's fp16/bf16 wrappers accept only 'torch.cuda.*Tensor' names
        if a or k:
            return cpu_type(self, *a, **k)
        name = cpu_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_as_cuda
    CudaToCpu().__enter__()


def build(tp_seed=1234, bf16=False, ddp_sharded=False, shard_aligned=False):
    """``ddp_sharded``: DDP reduce-scatters into Megatron's flat layout; ``shard_aligned``: into the per-parameter
    layout of ``shard_aligned_layout`` (megatron-core >= 0.19)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(tp_seed, inference_rng_tracker=True)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                            tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                            use_cpu_initialization=True, gated_linear_unit=True, hidden_dropout=0.0,
                            attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
                            bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                            apply_rope_fusion=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=128,
                     max_sequence_length=16, position_embedding_type="rope")
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(cfg, model)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=ddp_sharded or shard_aligned)
    if shard_aligned:
        from sara_ds.integrations.megatron_distributed import shard_aligned_layout

        return DistributedDataParallel(cfg, ddp_config, model, full_param_layout=shard_aligned_layout(model, ddp_config))
    return DistributedDataParallel(cfg, ddp_config, model)


def make_optimizer(model, sc):
    """``distributed_optimizer``: OptimizerConfig.use_distributed_optimizer (SARA's layer-wise ownership)."""
    from megatron.core.optimizer import OptimizerConfig

    from sara_ds.integrations.megatron import get_sara_megatron_optimizer

    ocfg = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.0, bf16=sc.get("bf16", False),
                           adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-6,
                           use_distributed_optimizer=sc.get("distributed_optimizer", False))
    return get_sara_megatron_optimizer(ocfg, [model], rank=4, update_proj_gap=2, preset=sc.get("preset", "sara"),
                                       optimizer=sc.get("optimizer", "SaraAdamW"),
                                       seed=7)


def train(model, opt, start, steps, split_batch=False, poison_at=None):
    """``split_batch``: a global batch of 6 sequences, each data-parallel rank taking its own slice (so DP=1, 2
    and 3 see the same data per step); otherwise every rank sees the same 2 sequences. ``poison_at``: the step at
    which the word embedding's gradient on the last rank gets one NaN before the data-parallel sum (the embedding is
    Megatron's Adam's, not SARA's); ``train`` then returns whether each step reported an update."""
    from megatron.core import parallel_state

    losses = []
    for step in range(start, steps):
        g = torch.Generator().manual_seed(50 + step)
        tokens = torch.randint(0, 128, (6 if split_batch else 2, 17), generator=g)
        if split_batch:
            dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
            tokens = tokens.chunk(dp)[rank]
        pos = torch.arange(16).unsqueeze(0).expand(tokens.shape[0], -1)
        opt.zero_grad()
        model.zero_grad_buffer()
        loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        if step == poison_at and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            embedding = next(p for n, p in model.named_parameters() if n.endswith("word_embeddings.weight"))
            embedding.main_grad.view(-1)[3] = float("nan")  # before the data-parallel sum, which spreads it
        if parallel_state.get_data_parallel_world_size() > 1:
            model.finish_grad_sync()
        ok, _, _ = opt.step()
        if poison_at is not None:
            losses.append(ok)
            continue
        assert ok
        losses.append(loss.item())
    return losses


def full_weights(model) -> dict:
    """Every weight at its TP=1 shape and layout (gathered over the tensor-parallel group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.module.named_parameters():
        t = p.detach().float()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            if "linear_fc1" in name:  # gated: each shard is [gate_i; up_i], TP=1 is [gate; up]
                halves = [part.chunk(2, dim=0) for part in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
            t = torch.cat(parts, dim=p.partition_dim)
        out[name.removeprefix("module.")] = t
    return out


def optimizer_bytes(opt, owner_of: dict) -> dict:
    """name -> bytes this rank holds for that parameter: optimizer state plus its fp32 master (if any)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    from sara_ds.optim import SaraOptimizer, tensors

    per_name = {}
    for wrapped in opt.chained_optimizers:
        inner = wrapped.optimizer
        if isinstance(wrapped, Float16OptimizerWithFloat16Params):
            pairs = [(m, p) for ms, ps in zip(wrapped.fp32_from_float16_groups, wrapped.float16_groups)
                     for m, p in zip(ms, ps)]
        else:
            pairs = [(p, p) for g in inner.param_groups for p in g["params"]]
        for main, model_param in pairs:
            name = owner_of[id(model_param)]
            state = inner.state_of(model_param) if isinstance(inner, SaraOptimizer) else inner.state.get(main, {})
            held = list(tensors(state))
            if main is not model_param:
                held.append(main)
            per_name[name] = per_name.get(name, 0) + sum(t.numel() * t.element_size() for t in held)
    return per_name


def sara_states(opt) -> dict:
    """name -> SARA's state of that matrix at TP=1 layout, from whichever rank holds it."""
    import torch.distributed as dist

    from sara_ds.integrations.megatron import sara_checkpoint

    mine = sara_checkpoint(opt).full_states()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {name: st for part in every for name, st in part.items()}


def save_checkpoint(model, opt, ckpt_dir):
    """torch format: per-rank state_dict() in memory. torch_dist: megatron's dist_checkpointing.save."""
    if ckpt_dir is None:
        buf_m, buf_o = io.BytesIO(), io.BytesIO()
        torch.save(model.state_dict(), buf_m)
        torch.save(opt.state_dict(), buf_o)
        return buf_m, buf_o
    from megatron.core import dist_checkpointing

    os.makedirs(ckpt_dir, exist_ok=True)
    model_sd = model.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, ckpt_dir)
    return None


def load_checkpoint(model, opt, saved, ckpt_dir):
    if ckpt_dir is None:
        buf_m, buf_o = saved
        buf_m.seek(0), buf_o.seek(0)
        model.load_state_dict(torch.load(buf_m, weights_only=False))
        opt.load_state_dict(torch.load(buf_o, weights_only=False))
        return
    from megatron.core import dist_checkpointing

    model_sd = model.module.sharded_state_dict()
    template = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}
    state = dist_checkpointing.load(template, ckpt_dir)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (a != a and b != b)


def run_scenario(sc, ckpt_dir):
    import torch.distributed as dist

    try:
        model = build(bf16=sc.get("bf16", False), ddp_sharded=sc.get("ddp_sharded", False),
                      shard_aligned=sc.get("shard_aligned", False))
        opt = make_optimizer(model, sc)
    except Exception as exc:  # refusals are reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    megatron_kind = lambda o: next(c.__name__ for c in type(o).__mro__ if c.__module__.startswith("megatron."))
    kinds = [megatron_kind(o) + ":" + type(o.optimizer).__name__ for o in opt.chained_optimizers]
    split = sc.get("split_batch", False)
    if sc.get("mode") == "save":  # torch_dist checkpoint for another run (another TP or DP size) to load
        train(model, opt, 0, sc["steps"], split_batch=split)
        save_checkpoint(model, opt, sc["ckpt"])
        return {"saved": True, "sara": sara_states(opt)}
    elif sc.get("mode") == "continue":  # load such a checkpoint and train on to sc["steps"]
        try:
            load_checkpoint(model, opt, None, sc["ckpt"])
        except BaseException as exc:  # torch.distributed.checkpoint's CheckpointException is a BaseException
            return {"error": f"{type(exc).__name__}: {exc}"}
        loaded = sara_states(opt)
        train(model, opt, sc["resume_at"], sc["steps"], split_batch=split)
        return {"weights": full_weights(model), "kinds": kinds, "sara": loaded}
    elif sc.get("mode") == "load":
        try:
            load_checkpoint(model, opt, None, sc["ckpt"])
            return {"error": None}
        except BaseException as exc:  # torch.distributed.checkpoint's CheckpointException is a BaseException
            return {"error": f"{type(exc).__name__}: {exc}"}
    elif sc.get("resume_at"):
        torch_dist = sc.get("format") == "torch_dist"
        train(model, opt, 0, sc["resume_at"], split_batch=split)
        saved = save_checkpoint(model, opt, ckpt_dir if torch_dist else None)
        straight = train(model, opt, sc["resume_at"], sc["steps"], split_batch=split)
        straight_weights = full_weights(model)
        model = build(bf16=sc.get("bf16", False), shard_aligned=sc.get("shard_aligned", False))
        opt = make_optimizer(model, sc)
        load_checkpoint(model, opt, saved, ckpt_dir if torch_dist else None)
        resumed = train(model, opt, sc["resume_at"], sc["steps"], split_batch=split)
        names = {id(p): n.removeprefix("module.") for n, p in model.module.named_parameters()}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, optimizer_bytes(opt, names))
        return {"straight": straight, "resumed": resumed, "kinds": kinds, "bytes": every,
                "same_weights": all(torch.equal(w, straight_weights[n]) for n, w in full_weights(model).items()),
                "files": sorted(os.listdir(ckpt_dir)) if torch_dist else None}
    elif "poison_at" in sc:  # a NaN in a gradient outside SARA's part of the chain
        from sara_ds.integrations.megatron import sara_state

        train(model, opt, 0, sc["poison_at"], split_batch=True)
        before = (full_weights(model), sara_states(opt))
        updated = train(model, opt, sc["poison_at"], sc["poison_at"] + 1, split_batch=True, poison_at=sc["poison_at"])
        after = (full_weights(model), sara_states(opt))
        return {"updated": updated, "weights_kept": all(torch.equal(w, after[0][n]) for n, w in before[0].items()),
                "sara_kept": _same(before[1], after[1]),
                "finite": all(bool(torch.isfinite(w).all()) for w in after[0].values()), "kinds": kinds,
                "refreshes": sara_state(opt).refresh_counts()["refreshes"]}
    elif sc.get("split_batch"):  # invariance to TP x DP: the final weights at TP=1 layout, bytes per rank
        from sara_ds.integrations.megatron import sara_state

        train(model, opt, 0, sc["steps"], split_batch=True)
        names = {id(p): n.removeprefix("module.") for n, p in model.module.named_parameters()}
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, (sara_state(opt).refresh_counts()["refreshes"],
                                        optimizer_bytes(opt, names)))
        return {"weights": full_weights(model), "kinds": kinds, "projected": sorted(sara_state(opt).param_names),
                "refreshes": sum(c[0] for c in counts), "bytes": [c[1] for c in counts],
                "owner": getattr(opt, "owner_of", None)}
    else:
        from sara_ds.integrations.megatron import sara_state

        sara = sara_state(opt)
        losses = train(model, opt, 0, sc["steps"])
        return {"losses": losses, "kinds": kinds, "refreshes": sara.refresh_counts()["refreshes"],
                "projected": sorted(sara.param_names[i] for i, _ in sara.matrix_states())}


def main(spec_path):
    tp, index = json.load(open(spec_path))["tp"], iter(range(10**6))
    serve(spec_path, lambda sc, spec: run_scenario(sc, os.path.join(spec["ckpt_dir"], str(next(index)))), tp=tp,
          before=install_cpu_shims)


if __name__ == "__main__":
    main(sys.argv[1])
