"""One rank of an FSDP2 test: the ds_worker model under ``fully_shard`` (each layer, then the root), trained on
this rank's micro-batches. It records the gradients FSDP2 hands the optimizer (``full_tensor``), which ``replay``
feeds to one process: the oracle."""
import os
import sys

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sara_ds  # noqa: E402
from ds_worker import SELECTION, build_model, global_batch  # noqa: E402
from worker import serve  # noqa: E402


def make_model(sc):
    """The ds_worker model; with ``row_weight``, also a [1, hidden] weight (FSDP2 leaves ranks past the first
    without a row of it), scaling the logits."""
    model = build_model()
    if sc.get("uneven_tp") or sc.get("row_parallel_extra"):  # unused by the forward; 5 rows: uneven column-wise
        model.extra = torch.nn.Linear(model.cfg.hidden, 5, bias=False)
    if sc.get("row_weight"):
        model.row_gate = torch.nn.Parameter(torch.full((1, model.cfg.hidden), 0.1))
    if sc.get("tp_bias"):  # under TP: column-parallel, its 1-D bias Shard(0) over "tp"
        model.biased = torch.nn.Linear(model.cfg.hidden, 8, bias=True)
    return model


def loss_of(model, x, y):
    logits = model(x)
    if hasattr(model, "row_gate"):
        logits = logits * (1 + model.row_gate.mean())
    if hasattr(model, "biased"):  # its output whole on every TP rank (output_layouts=Replicate())
        logits = logits * (1 + 0.01 * model.biased(torch.ones(1, model.cfg.hidden)).pow(2).mean())
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def build_optimizer(sc, model):
    params, optimizer = dict(sc["params"]), sc.get("optimizer", "SaraAdamW")
    if optimizer in sara_ds.OPTIMIZERS:
        selection = {k: params.pop(k) for k in list(params) if k in SELECTION}
        named = dict(model.named_parameters())
        only = [named[n] for n in sc["only"]] if "only" in sc else None  # the optimizer's parameters, if not all
        return sara_ds.OPTIMIZERS[optimizer](sara_ds.param_groups(model, **selection, only=only), **params)
    return getattr(torch.optim, optimizer)(model.parameters(), **params)


def replay(sc, grads):
    """One process, the same model and optimizer, fed the recorded gradients: the final weights."""
    model = make_model(sc)
    opt = build_optimizer(sc, model)
    named = dict(model.named_parameters())
    for step in grads:
        for n, g in step.items():
            named[n].grad = g.clone()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def run_scenario(sc, spec):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(sc)
    before = sc.get("built_before_sharding", False)
    if before:  # accelerate's order: the optimizer first, the DTensors swapped into its groups afterwards
        opt = build_optimizer(sc, model)
    placement, mesh, dp_rank, dp_world = None, None, rank, world
    if sc.get("tp"):  # FSDP x TP on a 2-D mesh: Megatron's column/row split of every layer, a vocab-parallel head
        mesh, dp_rank, dp_world = _tensor_parallel(model, sc["tp"], sc)
    elif sc.get("hsdp"):  # HSDP: 2 replicas, each sharded over world/2 ranks
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    if sc.get("shard_columns"):  # a shard_placement_fn that splits matrices by columns: refused by name
        from torch.distributed.tensor import Shard

        placement = lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % world == 0 else None  # noqa: E731
    for layer in model.layers:
        fully_shard(layer, shard_placement_fn=placement, mesh=mesh)
    if not sc.get("root_unsharded"):  # else the root's own parameters stay plain tensors, replicated
        fully_shard(model, mesh=mesh)
    if before:
        named = dict(model.named_parameters())
        for group, members in zip(opt.param_groups, opt.group_members):
            group["params"] = [named[opt.param_names[i]] for i in members]
    else:
        opt = build_optimizer(sc, model)
    if sc.get("template_only"):  # what DCP's get_state_dict makes of an optimizer that never stepped
        from torch.distributed.checkpoint.state_dict import get_state_dict

        _, optim_state = get_state_dict(model, opt)
        steps = [v for st in opt.state.values() for k, v in st.items() if k in ("step", "base_step")]
        return dict(name=sc["name"], counts=opt.refresh_counts(), steps=sorted(set(steps)),
                    keys=sorted(optim_state["state"]), weights_moved=False, state_bytes=0, layout="", sent={})
    if sc.get("load_from"):
        _load(model, opt, sc["load_from"])
    recorded = []
    for step in range(sc.get("start", 0), sc.get("steps", 7)):
        x, y = global_batch(step)
        per = x.shape[0] // dp_world
        loss_of(model, x[dp_rank * per:(dp_rank + 1) * per], y[dp_rank * per:(dp_rank + 1) * per]).backward()
        if sc.get("poison_step") == step and rank == world - 1:  # one NaN in the last rank's rows only
            grad = dict(model.named_parameters())[sc["poison"]].grad.to_local()
            grad.view(-1)[0] = float("nan")
        for p in model.parameters():  # plain parameters: averaged as a replicating wrapper (DDP, replicate) would
            if p.grad is not None and not isinstance(p.grad, DTensor):
                dist.all_reduce(p.grad)
                p.grad /= world
        recorded.append({n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
                         for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    if sc.get("peek"):  # a logging hook that looks up every parameter's state on every rank (owner or not)
        for p in model.parameters():
            opt.state_of(p)
    if sc.get("save_to"):
        _save(model, opt, sc["save_to"])
    weights = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for n, p in model.named_parameters()}
    local = [t.to_local() if isinstance(t, DTensor) else t for st in opt.state.values() for t in st.values()
             if isinstance(t, torch.Tensor)]
    return dict(name=sc["name"], weights=weights if rank == 0 else None, grads=recorded if rank == 0 else None,
                counts=opt.refresh_counts() if hasattr(opt, "refresh_counts") else {},
                state_bytes=sum(t.numel() * t.element_size() for t in local),  # this rank's share
                layout=type(getattr(opt, "layout", None)).__name__,
                sent=opt.bytes_sent() if hasattr(opt, "bytes_sent") else {},
                owners=dict(getattr(opt.layout, "owner", {})) if hasattr(opt, "layout") else {})


def _tensor_parallel(model, tp, sc):
    """sara_bench.llama.parallelize over the "tp" dim of a (world/tp, tp) mesh; returns the mesh's "dp" dim for
    fully_shard, and this rank's data-parallel index and size (TP peers train on the same micro-batch)."""
    import torch.distributed as dist
    from sara_bench import llama
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size() // tp, tp), mesh_dim_names=("dp", "tp"))
    tp_mesh = mesh["tp"]
    llama.parallelize(model, tp_mesh)
    if hasattr(model, "extra"):
        from torch.distributed.tensor.parallel import RowwiseParallel

        parallelize_module(model, tp_mesh, {"extra": RowwiseParallel() if sc.get("row_parallel_extra")
                                            else ColwiseParallel()})
    if hasattr(model, "biased"):
        from torch.distributed.tensor import Replicate

        parallelize_module(model, tp_mesh, {"biased": ColwiseParallel(output_layouts=Replicate())})
    dp = mesh["dp"]
    return dp, dp.get_local_rank(), dp.size()


def _save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)


def _load(model, opt, path):
    """DCP's recipe: a template from get_state_dict (an empty optimizer takes one zero step at lr 0 to make it),
    dcp.load into it at this world size, set_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)


if __name__ == "__main__":
    serve(sys.argv[1], run_scenario, gather=("counts", "state_bytes", "layout", "sent"))
    # Done, results saved and the process group destroyed. FSDP2's device meshes keep their gloo groups alive
    # until interpreter exit, where tearing them down can abort the process ("terminate called without an
    # active exception", seen once in 3-rank runs): leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
