"""The subspace rules as pure functions."""
import math

import pytest
import torch

from sara_ds import subspace


def test_importance_inclusion_frequencies_match_successive_sampling():
    sigma = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    rank, draws = 3, 20000
    expected = subspace.successive_inclusion_probabilities(sigma, rank)
    counts = torch.zeros(len(sigma))
    for k in range(draws):
        counts[subspace.importance_indices(sigma, rank, subspace.refresh_generator(7, 3, k))] += 1
    freq = counts / draws
    tolerance = 4 * torch.sqrt(expected * (1 - expected) / draws)
    print("expected", [round(float(x), 4) for x in expected])
    print("observed", [round(float(x), 4) for x in freq])
    assert torch.all((freq - expected).abs() < tolerance), (freq, expected)
    # and not the naive "inclusion proportional to sigma" (which would be 3*sigma/sum)
    naive = rank * sigma / sigma.sum()
    assert (freq - naive).abs().max() > 0.05


def test_importance_is_deterministic_in_seed_matrix_and_refresh():
    sigma = torch.linspace(3, 0.1, 40)
    draw = lambda s, m, r: subspace.importance_indices(sigma, 8, subspace.refresh_generator(s, m, r))  # noqa: E731
    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    assert not torch.equal(draw(1, 2, 3), draw(1, 2, 4))
    assert not torch.equal(draw(1, 2, 3), draw(1, 5, 3))
    assert not torch.equal(draw(1, 2, 3), draw(2, 2, 3))


@pytest.mark.parametrize("sigma", [torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0]), torch.zeros(5),
                                   torch.tensor([2.0, 0.0, 1.0, 0.0, 0.0])])
def test_importance_with_fewer_positive_singular_values_than_rank(sigma):
    idx = subspace.importance_indices(sigma, 4, subspace.refresh_generator(0, 0, 0))
    assert len(idx) == 4 and len(set(idx.tolist())) == 4
    positive = set(torch.nonzero(sigma > 0).flatten().tolist())
    assert positive <= set(idx.tolist())


def test_random_basis_is_orthonormal_and_reproducible():
    like = torch.zeros(1)
    b = subspace.random_basis(30, 6, subspace.refresh_generator(0, 1, 2), like)
    assert torch.allclose(b.T @ b, torch.eye(6), atol=1e-5)
    assert torch.equal(b, subspace.random_basis(30, 6, subspace.refresh_generator(0, 1, 2), like))


def test_grassmann_walk_moves_by_at_most_the_angle():
    b = torch.linalg.qr(torch.randn(30, 5)).Q
    angle = 0.4
    moved = subspace.grassmann_walk(b, angle, subspace.refresh_generator(0, 0, 1))
    assert torch.allclose(moved.T @ moved, torch.eye(5), atol=1e-5)
    cosines = torch.linalg.svdvals(b.T @ moved)
    principal = torch.arccos(cosines.clamp(max=1.0))
    assert principal.max() <= angle + 1e-4 and principal.max() > angle * 0.9
    assert 0.0 < subspace.overlap(b, moved) < 1.0


def test_online_pca_gradient_matches_autograd():
    torch.manual_seed(0)
    a = torch.randn(10, 7, dtype=torch.float64)
    b = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64)).Q + 0.01 * torch.randn(10, 3, dtype=torch.float64)
    bb = b.clone().requires_grad_(True)
    ah = a / a.norm()
    loss = (bb @ bb.T @ ah - ah).square().sum() + 0.1 * (bb.T @ bb - torch.eye(3, dtype=torch.float64)).square().sum()
    loss.backward()
    assert torch.allclose(subspace.online_pca_gradient(b, a, 0.1), bb.grad, atol=1e-10)


def test_overlap_bounds():
    b = torch.linalg.qr(torch.randn(20, 4)).Q
    assert math.isclose(subspace.overlap(b, b), 1.0, rel_tol=1e-5)
    q = torch.linalg.qr(torch.randn(20, 20)).Q
    assert subspace.overlap(q[:, :4], q[:, 4:8]) < 1e-6
