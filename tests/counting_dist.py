"""A counting wrapper around torch.distributed's collectives, for tests only.

``install()`` replaces the collectives on ``torch.distributed`` (which is what library code
calls, and what DeepSpeed's and megatron-core's communication wrappers call in turn) with
wrappers that record (op, number of ranks in the group, bytes this rank puts in), and the
group's global ranks beside it, then call the real collective. This counts what really crosses
the wire, independently of any counter the library keeps itself.
"""
import torch
import torch.utils._python_dispatch
import torch.distributed as dist

_OPS = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor",
        "all_to_all_single", "send", "recv", "all_gather_object", "broadcast_object_list")
# isend/irecv stay unwrapped: P2POp checks its op by identity. Point-to-point is counted in batch_isend_irecv.


class Counter:
    def __init__(self):
        self.records = []  # (op, group size, bytes sent by this rank)
        self.groups = []   # the global ranks of each record's group: tells TP from DP when both have 2 ranks
        self.enabled = True

    def bytes(self, op=None):
        return sum(b for o, _, b in self.records if op is None or o == op)

    def ops(self):
        return [o for o, _, _ in self.records]

    def on(self, ranks):
        """(op, bytes) of the records made over the group whose global ranks are ``ranks``."""
        return [(o, b) for (o, _, b), g in zip(self.records, self.groups) if g == tuple(ranks)]

    def record(self, op, group, nbytes):
        self.records.append((op, dist.get_world_size(group), nbytes))
        self.groups.append(tuple(dist.get_process_group_ranks(group)) if group is not None
                           else tuple(range(dist.get_world_size())))

    def clear(self):
        self.records.clear()
        self.groups.clear()


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _sent(op, args, kwargs):
    def arg(i, name):  # DeepSpeed's comm layer passes keywords, library code positions
        return args[i] if len(args) > i else kwargs.get(name)

    if op == "broadcast":  # only the source puts the tensor on the wire
        return _nbytes(arg(0, "tensor")) if arg(1, "src") == dist.get_rank() else 0
    if op in ("all_reduce", "send"):
        return _nbytes(arg(0, "tensor"))
    if op == "all_to_all_single":
        return _nbytes(arg(1, "input"))
    if op == "all_gather":
        return _nbytes(arg(1, "tensor"))
    if op in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        return _nbytes(arg(1, "input_tensor" if op == "all_gather_into_tensor" else "input"))
    return 0


def install() -> Counter:
    counter = Counter()
    for op in _OPS:
        real = getattr(dist, op)

        def wrapped(*args, _real=real, _op=op, **kwargs):
            if counter.enabled:
                counter.record(_op, kwargs.get("group"), _sent(_op, args, kwargs))
            return _real(*args, **kwargs)

        setattr(dist, op, wrapped)
    real_batch = dist.batch_isend_irecv

    def batch(ops):
        if counter.enabled:
            for p in ops:
                if p.op is dist.isend:
                    counter.record("p2p_send", p.group, _nbytes(p.tensor))
        return real_batch(ops)

    dist.batch_isend_irecv = batch
    return counter


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (``aten._local_scalar_dense``: ``.item()``,
    ``bool(t)``, ``float(t)``): on a GPU each one waits for the device to catch up."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
