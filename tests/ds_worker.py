"""One rank of a DeepSpeed test: runs a list of scenarios in one process group (start-up is paid once).

Importable without side effects: tests use ``build_model``, ``global_batch`` and ``reference_weights``.
"""
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sara_ds  # noqa: E402
from dense import dense_run  # noqa: E402
from sara_bench import llama  # noqa: E402
from worker import serve  # noqa: E402

GLOBAL_BATCH, SEQ = 12, 8


GRID = 2.0**-24  # fixed-point grid for per-rank gradients: sums of three are exact in fp32, in any order


def _to_grid(g):
    return (g.clamp(-0.25, 0.25) / GRID).round() * GRID


def build_model(seed=0, grid_grads=False, poison=None):
    """Five identical layers: each param group is partitioned on its own, and an odd layer count puts the
    2- and 3-rank partition boundaries inside matrices (straddlers).

    ``poison`` = (parameter name, step, rank): that rank's gradient of that parameter gets one NaN at
    that step, so after the reduction only the ranks owning that element see it."""
    torch.manual_seed(seed)
    model = llama.Llama(llama.LlamaConfig(vocab_size=64, hidden=16, layers=5, heads=2, intermediate=48, max_seq=SEQ))
    if grid_grads:
        for p in model.parameters():
            p.register_hook(_to_grid)
    if poison:
        name, step, rank = poison
        calls = iter(range(10**6))

        def hook(g):
            if next(calls) == step and torch.distributed.get_rank() == rank:
                g = g.clone()
                g.view(-1)[g.numel() // 2] = float("nan")
            return g

        dict(model.named_parameters())[name].register_hook(hook)
    return model


def global_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def reference_weights(optimizer="SaraAdamW", params=None, steps=7, world=1, grid_grads=False, skip_step=None):
    """The same training on one process with no DeepSpeed (``dense.dense_run``): the layout-invariance oracle.
    ``world`` may be a list (one entry per step): a run resumed at another data-parallel size."""
    params = {k: v for k, v in (params or {}).items() if k not in LAYOUT_KEYS}
    selection = {k: params.pop(k) for k in list(params) if k in ("rank", "update_proj_gap", "scale", "proj_type")}
    model = build_model(grid_grads=grid_grads)
    opt = sara_ds.OPTIMIZERS[optimizer](sara_ds.param_groups(model, **selection), **params)

    def loss_of(step, rank, ranks):
        x, y = global_batch(step)
        per = GLOBAL_BATCH // ranks
        return model(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])

    dense_run(list(model.parameters()), opt, steps, loss_of, world, grid=grid_grads,
              skip=() if skip_step is None else (skip_step,))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def replayed_weights(optimizer, params, grads, groups="two", initial=None):
    """One process, no DeepSpeed, fed the very gradients a run recorded (``record_grads``), one dict per step.

    ZeRO-3's module hooks add autograd nodes, so a gradient that sums several paths (the embedding's, the
    residual stream's) is accumulated in another order than in a plain model: the gradients already differ
    in the last bits before any optimizer runs (1e-8 at one rank; DeepSpeed's own AdamW shows it too). Fed the
    same gradients, what is compared is the optimizer's layout invariance alone."""
    params = {k: v for k, v in (params or {}).items() if k not in LAYOUT_KEYS}  # ZeRO-3's layout: not in one process
    model = build_model()
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in (initial or {}).items():
            named[n].copy_(w)
    if optimizer in sara_ds.OPTIMIZERS and groups == "three":
        opt = sara_ds.OPTIMIZERS[optimizer](three_groups(model, params), **params)
    elif optimizer in sara_ds.OPTIMIZERS:
        selection = {k: params.pop(k) for k in list(params) if k in SELECTION}
        opt = sara_ds.OPTIMIZERS[optimizer](sara_ds.param_groups(model, **selection), **params)
    else:
        params.pop("torch_adam", None)
        opt = getattr(torch.optim, optimizer)(model.parameters(), **params)
    for step in grads:
        for n, g in step.items():
            named[n].grad = g.clone()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def ds_config(sc, world):
    zero = {"stage": 2, "reduce_scatter": True, "overlap_comm": False, "contiguous_gradients": True}
    zero.update(sc.get("zero", {}))
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "optimizer": {"type": sc.get("optimizer", "SaraAdamW"), "params": dict(sc["params"])},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 when the key is absent; the single-process oracle does not
    }
    if sc.get("dtype") == "bf16":
        cfg["bf16"] = {"enabled": True}
    if sc.get("dtype") == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": sc.get("initial_scale_power", 8), "loss_scale_window": 2}
    if zero.get("offload_optimizer"):
        cfg["zero_force_ds_cpu_optimizer"] = False
    cfg.update(sc.get("extra_config", {}))
    return cfg


SELECTION = ("rank", "update_proj_gap", "scale", "proj_type")
LAYOUT_KEYS = ("zero3_ownership", "zero3_spectrum")


def three_groups(model, params):
    """Full-rank parameters, attention projections at ``rank`` and MLP projections at ``rank - 1``: param groups
    the engine is handed as such (the other scenarios let the factory build two from the config)."""
    selection = {k: params.pop(k) for k in list(params) if k in SELECTION}
    regular, projected = sara_ds.param_groups(model, **selection)
    attn = [i for i, n in enumerate(projected["param_names"]) if ".attn." in n]
    mlp = [i for i in range(len(projected["params"])) if i not in attn]

    def part(group, keep, **change):
        return dict(group, params=[group["params"][i] for i in keep],
                    param_names=[group["param_names"][i] for i in keep], **change)

    return [regular, part(projected, attn), part(projected, mlp, rank=projected["rank"] - 1)]


def make_engine(sc, world):
    import deepspeed

    config = ds_config(sc, world)
    if sc.get("zero_init"):  # parameters are partitioned as they are created: p.ndim is 1, the shape is ds_shape
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = build_model(grid_grads=sc.get("grid_grads", False), poison=sc.get("poison"))
    else:
        model = build_model(grid_grads=sc.get("grid_grads", False), poison=sc.get("poison"))
    parameters = model.parameters()
    if sc.get("three_groups"):
        parameters = three_groups(model, config["optimizer"]["params"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameters, config=config)
    return model, engine


def inner(engine):
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") else opt


def full_weights(model, engine):
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in model.named_parameters():
        v = safe_get_full_fp32_param(p) if engine.zero_optimization() else p.detach().float()
        out[n] = v.detach().clone()
    return out


def train(engine, start, steps, rank, world, reads=None, grads=None):
    per = GLOBAL_BATCH // world
    losses = []
    for step in range(start, steps):
        x, y = global_batch(step)
        loss = engine(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        engine.backward(loss)
        if grads is not None:  # the reduced gradient the optimizer is about to see (a collective at ZeRO-3)
            from deepspeed.utils import safe_get_full_grad

            grads.append({n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()})
        if reads is not None:
            reads.append([])  # this engine step's calls of the SARA optimizer's step
        engine.step()
        losses.append(loss.item())
    return losses


def count_host_reads(opt, reads: list) -> None:
    """Record the host reads of every call of ``opt.step`` (ZeRO calls it once per param group)."""
    import counting_dist

    real = opt.step

    def counted(*args, **kwargs):
        with counting_dist.HostReads() as host:
            out = real(*args, **kwargs)
        reads[-1].append(host.count)
        return out

    opt.step = counted


def run_scenario(sc, rank, world, tmp):
    import torch.distributed as dist

    result = {"name": sc.get("name")}
    model, engine = make_engine(sc, world)
    opt = inner(engine)
    steps = sc.get("steps", 7)
    if "load_from" in sc:
        from sara_ds.integrations.deepspeed import load_checkpoint

        load_checkpoint(engine, sc["load_from"], tag=sc.get("load_tag"))
        start = sc.get("resume_step", 0)
        result["grads"] = [] if sc.get("record_grads") else None
        result["losses"] = train(engine, start, sc.get("steps", start + 1), rank, world, grads=result["grads"])
    elif sc.get("resume_at"):
        train(engine, 0, sc["resume_at"], rank, world)
        ckpt = os.path.join(tmp, f"ckpt-{sc['name']}")
        engine.save_checkpoint(ckpt, tag="mid")
        dist.barrier()
        del engine
        gc.collect()
        model, engine = make_engine(sc, world)
        engine.load_checkpoint(ckpt, tag="mid")
        opt = inner(engine)
        train(engine, sc["resume_at"], steps, rank, world)
    elif sc.get("record_grads"):
        result["initial"] = full_weights(model, engine)  # zero.Init draws the initial weights its own way
        result["grads"] = []
        result["losses"] = train(engine, 0, steps, rank, world, grads=result["grads"])
    elif sc.get("count_reads"):
        reads = []
        count_host_reads(opt, reads)
        result["losses"] = train(engine, 0, steps, rank, world, reads)
        result["step_reads"] = reads
    else:
        result["losses"] = train(engine, 0, steps, rank, world)
    if "save_to" in sc:
        from deepspeed.checkpoint import UNIVERSAL_CHECKPOINT_INFO

        engine.save_checkpoint(sc["save_to"], tag="final", client_state={UNIVERSAL_CHECKPOINT_INFO: {}})
    result["weights"] = full_weights(model, engine)
    if sc.get("return_state"):  # one rank: {matrix id: state}
        result["state"] = dict(opt.matrix_states()) | {i: st for i, st in opt.state.items() if isinstance(i, int)}
    gathered = [None] * world
    if not isinstance(opt, sara_ds.SaraOptimizer):  # a stock peer (torch's AdamW through DeepSpeed)
        dist.all_gather_object(gathered, {"type": type(opt).__name__, "wrapper": type(engine.optimizer).__name__})
        result["ranks"] = gathered
        del engine
        gc.collect()
        return result
    partitions = opt.layout.partitions
    straddlers = sum(1 for part in partitions.values() for f in part.fragments
                     if f.numel < opt.matrices[f.index].shape.numel() and len(opt.matrices[f.index].shape) == 2)
    mine = {"state_bytes": opt.state_bytes(), "straddlers": straddlers, "counts": opt.refresh_counts(),
            "exchange_bytes": opt.zero_bytes_sent(), "steppers": {i: part.rank for part in partitions.values()
                                                                  for i in part.steppers or {} if part.steps(i)},
            "rows": {i: blocks for part in partitions.values() for i, blocks in part.rows.items()},
            "roots": {i: root for part in partitions.values() for i, root in part.roots.items()},
            "row_block_bytes": opt.bytes_sent().get("row_blocks", 0),
            "refreshes": {i: st["refreshes"] for i, st in opt.matrix_states()},
            "matrices": sorted(i for i, _ in opt.matrix_states()),
            "overlaps": opt.subspace_overlaps(), "type": type(opt).__name__, "wrapper": type(engine.optimizer).__name__,
            "banks": sum(size > 1 for size in opt.banks.sizes())}
    dist.all_gather_object(gathered, mine)
    result["ranks"] = gathered
    dist.barrier()
    del engine
    gc.collect()
    return result


def main(spec_path):
    import torch.distributed as dist

    serve(spec_path, lambda sc, spec: run_scenario(sc, dist.get_rank(), dist.get_world_size(), spec["tmp"]),
          engine="deepspeed")


if __name__ == "__main__":
    main(sys.argv[1])
