"""Which parameters are projected: the papers' rule, with include/exclude overrides."""
from __future__ import annotations

import re

import torch.nn as nn

PAPER_INCLUDE = ("attn", "mlp")


def param_groups(model: nn.Module, rank: int, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", include=PAPER_INCLUDE, exclude=(), only=None, shape_of=None,
                 **projected_options) -> list[dict]:
    """Two galore-torch style groups: projected matrices and everything else.

    A weight is projected when it belongs to an ``nn.Linear`` (or one of Megatron's
    parallel linears, or the ``LinearLayer``/``LinearAllreduce`` DeepSpeed's AutoTP puts
    in its place) whose qualified module name matches any
    ``include`` regex and no ``exclude`` regex. That is the GaLore/Fira/SARA
    protocol: q, k, v, o, gate, up and down projections, while embeddings,
    lm_head, norms and biases get the full-rank base update. ``only`` restricts
    the groups to a given collection of parameters (what an engine was handed), and ``shape_of`` gives a
    parameter's shape where an engine holds it as a stub (DeepSpeed's ZeRO-3: ``integrations.deepspeed``).
    """
    shape_of = shape_of or (lambda p: p.shape)
    only_ids = None if only is None else {id(p) for p in only}
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    projected, projected_names, regular, regular_names = [], [], [], []
    seen = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad or (only_ids is not None and id(p) not in only_ids):
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            if (pname == "weight" and len(shape_of(p)) >= 2 and _is_linear(module)
                    and any(r.search(module_name) for r in include) and not any(r.search(module_name) for r in exclude)):
                projected.append(p)
                projected_names.append(full)
            else:
                regular.append(p)
                regular_names.append(full)
    if not projected:
        raise ValueError(
            f"sara_ds: no parameter matched include={[r.pattern for r in include]} "
            f"(exclude={[r.pattern for r in exclude]}); nothing would be projected"
        )
    groups = [dict(params=projected, param_names=projected_names, rank=rank, update_proj_gap=update_proj_gap,
                   scale=scale, proj_type=proj_type, **projected_options)]
    if regular:
        groups.insert(0, dict(params=regular, param_names=regular_names))
    return groups


def _patterns(key: str, patterns) -> list:
    compiled = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as exc:
            raise ValueError(f"sara_ds: {key} must hold regular expressions, got {key}={pattern!r}: {exc}") from None
    return compiled


# Megatron's parallel linears, and what DeepSpeed's AutoTP swaps nn.Linear for (and their subclasses).
PARALLEL_LINEARS = ("ColumnParallelLinear", "RowParallelLinear", "LinearLayer", "LinearAllreduce", "SubParamLinearLayer",
                    "SubParamLinearAllreduce")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or any(c.__name__ in PARALLEL_LINEARS for c in type(module).__mro__)
