"""The layout-invariance oracle every multi-process test compares against: one process, the whole matrices.

Each step's gradient is formed the way data parallelism forms it: every rank's micro-batch gradient, divided by
the number of ranks, summed in rank order. The optimizer then sees the bits a data-parallel rank sees, so what a
test compares is the optimizer's layout invariance, not the round-off of a global-batch mean (which the
importance rule can amplify). With ``grid`` the per-rank gradients are on a fixed-point grid (the model's hooks
put them there), summed exactly, then scaled by fl(1/world) as DeepSpeed's all-reduce path does.
"""
import torch


def dense_run(params: list, optimizer, steps: int, loss_of, world=1, *, grid: bool = False, jitter: float = 0.0,
              noise_seed: int = 5, clip: float | None = None, skip=(), poison=None) -> list:
    """Train ``params`` with ``optimizer`` for ``steps`` steps; returns the gradient norms ``clip`` clipped at.

    ``loss_of(step, rank, world)``: that rank's loss at that step. ``world``: the data-parallel size, or one per
    step (a run resumed at another size). ``jitter``: every gradient times (1 + jitter N(0, 1)), to measure how far
    a rule carries fp32 round-off (a relative 1e-7 is about one ulp). ``skip``: steps left out entirely.
    ``poison(step, params)``: changes the gradients before the step (a NaN)."""
    noise, norms = torch.Generator().manual_seed(noise_seed), []
    for step in range(steps):
        if step in skip:
            continue
        ranks = world[step] if isinstance(world, (list, tuple)) else world
        total = None
        for rank in range(ranks):
            optimizer.zero_grad()
            loss_of(step, rank, ranks).backward()
            grads = [p.grad.clone() if grid else p.grad / ranks for p in params]
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
        if grid:
            total = [t * (1.0 / ranks) for t in total]
        for p, g in zip(params, total):
            p.grad = g * (1 + jitter * torch.randn(g.shape, generator=noise)) if jitter else g
        if clip:  # as DeepSpeed: grads * clip / (||g|| + 1e-6) when the norm exceeds clip
            norms.append(torch.nn.utils.clip_grad_norm_(params, clip).item())
        if poison is not None:
            poison(step, params)
        optimizer.step()
    return norms
