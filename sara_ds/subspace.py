"""How a rank-r basis is chosen: the subspace rules, as pure functions.

Every rule returns an orthonormal basis B (d x r) of the *projected* side of a
gradient: d = rows for a left basis (R = B^T G), d = columns for a right basis
(R = G B). Nothing here knows about optimizers, processes or devices beyond the
tensors it is handed.

Randomness never comes from global RNG state. A rule that draws gets a CPU
``torch.Generator`` seeded from (seed, matrix id, refresh index), so every
process holding a piece of the same matrix draws the same thing, and a resumed
run draws what the uninterrupted one would have.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

RULES = ("importance", "dominant", "random", "online_pca", "grass_walk")
SPECTRAL_RULES = ("importance", "dominant")  # rules that need singular values

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def refresh_generator(seed: int, matrix_id: int, refresh_index: int) -> torch.Generator:
    """CPU generator for one refresh of one matrix; a pure function of its three ints."""
    mixed = _splitmix64(_splitmix64(_splitmix64(seed) ^ matrix_id) ^ refresh_index)
    return torch.Generator(device="cpu").manual_seed(mixed & ((1 << 63) - 1))


def dominant_indices(sigma: Tensor, rank: int) -> Tensor:
    """GaLore: the top-r singular directions (sigma is sorted descending)."""
    return torch.arange(rank)


def importance_indices(sigma: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """SARA: r indices drawn without replacement, successive draws with weights ~ sigma_i.

    ``torch.multinomial`` cannot draw more indices than there are positive
    weights. When fewer than r singular values are positive (rank-deficient or
    zero gradient), all positive ones are drawn and the rest of the basis is
    filled with the remaining directions in spectral order; those directions
    carry no gradient, so which ones fill the gap does not change the update.
    """
    weights = sigma.detach().to(device="cpu", dtype=torch.float32).clamp_min(0)
    positive = int((weights > 0).sum())
    drawn = min(rank, positive)
    chosen = torch.multinomial(weights, drawn, replacement=False, generator=generator) if drawn else torch.empty(0, dtype=torch.long)
    if drawn < rank:
        taken = torch.zeros(weights.numel(), dtype=torch.bool)
        taken[chosen] = True
        fill = torch.nonzero(~taken).flatten()[: rank - drawn]
        chosen = torch.cat([chosen, fill])
    return chosen.sort().values


def random_basis(dim: int, rank: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """GoLore / GrassJump: a Haar-random orthonormal d x r basis (Gaussian + sign-fixed QR)."""
    gaussian = torch.randn(dim, rank, generator=generator, dtype=torch.float32)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.sign(torch.diagonal(r)) + 0.5)  # sign fix makes QR Haar-distributed
    return q.to(device=like.device, dtype=like.dtype)


def grassmann_walk(basis: Tensor, angle: float, generator: torch.Generator) -> Tensor:
    """GrassWalk: a geodesic step of the subspace along a random tangent direction.

    The tangent is a Gaussian matrix projected off span(B) and scaled so its
    largest singular value is 1; its principal angles to span(B) after the step
    are at most ``angle`` radians. Exponential map on the Grassmannian:
    B' = B V cos(angle S) V^T + U sin(angle S) V^T  with  tangent = U S V^T.
    """
    d, r = basis.shape
    z = torch.randn(d, r, generator=generator, dtype=torch.float32).to(basis)
    tangent = z - basis @ (basis.mT @ z)
    u, s, vh = torch.linalg.svd(tangent, full_matrices=False)
    theta = angle * s / s.max().clamp_min(torch.finfo(s.dtype).tiny)
    moved = (basis @ vh.mT) * torch.cos(theta) @ vh + (u * torch.sin(theta)) @ vh
    q, r_ = torch.linalg.qr(moved)  # re-orthonormalise against round-off drift
    return q * torch.sign(torch.sign(torch.diagonal(r_)) + 0.5)


def online_pca_gradient(basis: Tensor, a: Tensor, orth_penalty: float, reduce=lambda t: t, rows=None) -> Tensor:
    """Online Subspace Descent: d/dB of ||B B^T A_hat - A_hat||^2 + lam ||B^T B - I||^2.

    A_hat = A / ||A||_F. Written with r-sized intermediates: for Y = B^T A_hat and
    E = B Y - A_hat, the gradient is 2 (E Y^T + A_hat (B^T B Y - Y)^T). Under tensor
    parallelism ``a`` is this rank's shard of A and ``reduce`` sums over the shards. Where
    A's columns are split, the norm and that gradient are sums over them. Where its rows
    are, ``rows`` = (the rows of B matching this rank's rows of A, every rank's rows stacked):
    Y is a sum over the shards, and each rank's rows of the gradient are stacked.
    """
    norm = reduce(a.square().sum()).sqrt()
    a_hat = a / norm.clamp_min(torch.finfo(a.dtype).tiny)
    local = basis if rows is None else rows[0](basis)
    y = local.mT @ a_hat
    y = y if rows is None else reduce(y)
    gram = basis.mT @ basis
    e = local @ y - a_hat
    part = e @ y.mT + a_hat @ (gram @ y - y).mT
    grad = 2 * (reduce(part) if rows is None else rows[1](part))
    if orth_penalty:
        grad += 4 * orth_penalty * basis @ (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    return grad


SIGN_CONVENTIONS = ("aligned", "lapack")


def align_signs(new: Tensor, old: Tensor | None, min_cosine: float = 0.1) -> Tensor:
    """Fix the arbitrary sign of each basis vector, so trajectories do not depend on how the SVD was computed.

    Kept moments are reused coordinate by coordinate, so vector j of the new basis
    takes the sign that agrees with vector j of the old one. Where the two are
    nearly orthogonal (a different direction was drawn) or there is no old basis,
    the entry of largest magnitude is made positive.
    """
    rows = torch.arange(new.shape[1], device=new.device)
    canonical = torch.sign(new[new.abs().argmax(dim=0), rows])
    if old is None:
        signs = canonical
    else:
        cosine = (old * new).sum(dim=0)
        signs = torch.where(cosine.abs() > min_cosine, torch.sign(cosine), canonical)
    return new * torch.where(signs == 0, torch.ones_like(signs), signs)


def overlap(old: Tensor, new: Tensor) -> Tensor:
    """||B_old^T B_new||_F^2 / r: mean squared cosine of the principal angles, in [0, 1] (0-d, where B is)."""
    return (old.mT @ new).square().sum() / new.shape[1]


def spectral_indices(rule: str, sigma: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    if rule == "dominant":
        return dominant_indices(sigma, rank)
    return importance_indices(sigma, rank, generator)


def successive_inclusion_probabilities(sigma: Tensor, rank: int) -> Tensor:
    """Exact inclusion probability of each index under successive sampling ~ sigma.

    Exponential in the number of positive weights; for tests and small spectra only.
    """
    w = [float(x) for x in sigma]
    n = len(w)
    probs = [0.0] * n

    def walk(chosen: tuple, p: float, remaining_mass: float):
        if len(chosen) == rank:
            for i in chosen:
                probs[i] += p
            return
        for i in range(n):
            if i in chosen or w[i] <= 0:
                continue
            walk(chosen + (i,), p * w[i] / remaining_mass, remaining_mass - w[i])

    walk((), 1.0, math.fsum(w))
    return torch.tensor(probs)
