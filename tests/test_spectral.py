"""The spectral maths (sara_ds/spectral.py) as pure functions, and the single-process spectra
(``spectrum='gram'`` and ``spectrum='sketch'``)."""
import pytest
import torch

import sara_ds
from sara_ds import spectral


def decaying(rows=300, n=120, decay=0.9, seed=0):
    """A rows x n matrix with singular values decay**i and random singular vectors."""
    g, m = torch.Generator().manual_seed(seed), min(rows, n)
    u = torch.linalg.qr(torch.randn(rows, m, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=g)).Q
    return u @ torch.diag(decay ** torch.arange(m, dtype=torch.float32)) @ v.mT


def projector_onto(vectors):
    return vectors @ vectors.mT


def residual_ratio(a, vectors, r):
    """||A - A V V^T||_F over the best rank-r residual: 1 is optimal."""
    sigma = torch.linalg.svdvals(a.double())
    best = sigma[r:].square().sum().sqrt()
    return ((a - a @ projector_onto(vectors[:, :r])).double().norm() / best).item()


def test_tsqr_and_gram_in_one_process_are_the_full_svd():
    a = decaying()
    s_ref, v_ref = spectral.full_svd(a, left=False)
    for name, (s, v) in {"tsqr": spectral.tsqr(a), "gram": spectral.gram_eigh(a)}.items():
        assert torch.allclose(s[:20], s_ref[:20], rtol=1e-4), name
        assert (projector_onto(v[:, :10]) - projector_onto(v_ref[:, :10])).abs().max() < 1e-4, name


def test_the_sketch_finds_the_top_subspace_and_power_iterations_are_what_make_it():
    a, r = decaying(decay=0.97), 16
    gen = torch.Generator().manual_seed(11)
    k = spectral.sketch_size(a.shape[1], r, 8)
    omega = spectral.sketch_test_matrix(gen, a.shape[0], k)
    s_ref = torch.linalg.svdvals(a)
    s, v = spectral.sketch(a, omega, power_iters=2)
    assert s.shape == (k,) and v.shape == (a.shape[1], k)
    # sigma_i = 0.97^i decays slowly: the leading values are sharp, the r-th within a few percent
    assert torch.allclose(s[:4], s_ref[:4], rtol=2e-3) and torch.allclose(s[:r], s_ref[:r], rtol=5e-2)
    assert residual_ratio(a, v, r) < 1.01                        # measured 1.007
    _, v0 = spectral.sketch(a, omega, power_iters=0)             # without power iterations: 1.16
    assert residual_ratio(a, v0, r) > 1.1


def test_a_sketch_as_wide_as_the_matrix_is_the_exact_spectrum():
    a = decaying(rows=80, n=24)
    s_ref, v_ref = spectral.full_svd(a, left=False)
    s, v = spectral.local_spectrum(a, left=False, method="sketch", generator=torch.Generator().manual_seed(1),
                                   rank=4, oversample=64)
    assert torch.allclose(s, s_ref, rtol=1e-4, atol=1e-6)
    assert (projector_onto(v[:, :8]) - projector_onto(v_ref[:, :8])).abs().max() < 1e-4
    # the basis side follows ``left`` as full_svd's does
    s_left, u_left = spectral.local_spectrum(a.mT, left=True, method="sketch",
                                             generator=torch.Generator().manual_seed(1), rank=4, oversample=64)
    assert u_left.shape == (24, 24) and torch.allclose(s_left, s_ref, rtol=1e-4, atol=1e-6)


def _train(spectrum, preset="sara", oversample=8, steps=7):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 160) * 0.1)
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=4, update_proj_gap=3, scale=1.0)], lr=1e-2, preset=preset,
                            spectrum=spectrum, sketch_oversample=oversample)
    g = torch.Generator().manual_seed(4)
    target = decaying(48, 160, 0.95, seed=2)
    for _ in range(steps):
        x = torch.randn(32, 160, generator=g)
        loss = ((x @ w.mT - x @ target.mT) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().clone(), opt


@pytest.mark.parametrize("spectrum", ["gram", "sketch"])
@pytest.mark.parametrize("preset", ["sara", "galore", "sara_fira"])
def test_gram_and_sketch_refresh_without_an_svd(preset, spectrum, monkeypatch):
    real_svd = torch.linalg.svd
    calls = []

    def counting_svd(*args, **kwargs):
        calls.append(args[0].shape)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    _, exact = _train("svd", preset)
    assert len(calls) == 3  # refreshes at steps 0, 3, 6, one SVD each
    calls.clear()
    _, other = _train(spectrum, preset)
    assert calls == [] and other.refresh_counts()["refreshes"] == 3


@pytest.mark.parametrize("preset", ["sara", "galore"])
def test_a_sketch_as_wide_as_the_matrix_trains_as_the_svd_does(preset):
    w_svd, _ = _train("svd", preset)
    w_sketch, _ = _train("sketch", preset, oversample=48)  # k = min(48, 4 + 48): the whole basis side
    assert (w_svd - w_sketch).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["sara", "galore"])
def test_the_gram_spectrum_trains_as_the_svd_does(preset):
    w_svd, _ = _train("svd", preset)
    w_gram, _ = _train("gram", preset)
    assert (w_svd - w_gram).abs().max() < 1e-5


def test_a_narrow_sketch_is_a_different_spectrum():
    w_svd, _ = _train("svd", "sara")
    w_sketch, _ = _train("sketch", "sara", oversample=2)  # k = 6 of 48: sampling among the top 6 only
    assert (w_svd - w_sketch).abs().max() > 1e-4


def test_an_unknown_spectrum_is_refused_by_name():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"spectrum must be one of \('svd', 'gram', 'sketch'\), got spectrum='qr'"):
        sara_ds.SaraAdamW([dict(params=[w], rank=2)], spectrum="qr")


def test_a_gesvda_that_does_not_converge_is_redone_by_the_default_driver_with_a_warning():
    """The CUDA refresh's fallback (gesvda exists on CUDA only, so its refusal is played here by a stand-in)."""
    calls = []

    def svd(a, full_matrices, driver=None):
        calls.append(driver)
        if driver == "gesvda":
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 4088).")
        return torch.linalg.svd(a, full_matrices=full_matrices)

    a = torch.randn(3, 40, 12, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match=r"gesvda did not converge on a \(3, 40, 12\) refresh"):
        u, s, vh = spectral.gesvda_or_default(a, svd)
    assert calls == ["gesvda", None]
    assert torch.allclose((u * s.unsqueeze(-2)) @ vh, a, atol=1e-5)
