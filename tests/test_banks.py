"""Banks (sara_ds.banks): same-shape projected matrices stepped as one, against the per-matrix path.

``foreach=True`` banks (the default only for CUDA gradients); ``foreach=False`` keeps every matrix on the
per-matrix path, the readable reference the banks must equal bit for bit: same functions, same arithmetic,
a leading bank dim.
"""
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sara_ds

SHAPES = [(24, 40)] * 3 + [(40, 24)] * 3 + [(24, 24)] * 2 + [(16, 24)]  # three banks of >1 and one loner


def _run(cls, foreach, steps=7, dtype=torch.float32, weight_decay=0.1, state=None, start=0, **options):
    torch.manual_seed(0)
    weights = [torch.nn.Parameter((torch.randn(s) * 0.1).to(dtype)) for s in SHAPES]
    vector = torch.nn.Parameter(torch.randn(24).to(dtype) * 0.1)
    opt = cls([dict(params=weights, rank=4, update_proj_gap=3), dict(params=[vector])], lr=1e-2,
              weight_decay=weight_decay, foreach=foreach, **options)
    if state is not None:
        weights_state, opt_state = state
        with torch.no_grad():
            for p, w in zip(weights + [vector], weights_state):
                p.copy_(w)
        opt.load_state_dict(opt_state)
    for step in range(start, steps):
        g = torch.Generator().manual_seed(100 + step)
        for p in weights + [vector]:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return [p.detach().clone() for p in weights + [vector]], opt


def _state_tensors(opt):
    return [(k, v) for st in opt.state.values() for k, v in sorted(st.items()) if isinstance(v, torch.Tensor)]


CASES = [(sara_ds.SaraAdamW, preset) for preset in ("sara", "galore", "fira", "sara_fira", "golore", "grassjump",
                                                   "grasswalk")]
CASES += [(sara_ds.SaraAdamW, None, dict(subspace="importance", moments_on_refresh="reset")),
          (sara_ds.SaraAdafactor, "sara", {}), (sara_ds.SaraAdafactor, "sara_fira", dict(beta1=0.9)),
          (sara_ds.SaraAdamMini, "sara", {}), (sara_ds.SaraAdamMini, "fira", {})]
CASES = [c if len(c) == 3 else (*c, {}) for c in CASES]


@pytest.mark.parametrize("cls,preset,extra", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True], ids=["update", "in-place"])
def test_a_bank_step_is_the_per_matrix_step_bit_for_bit(cls, preset, extra, dtype, in_place):
    if in_place:  # these small matrices take B N by addmm_ straight into the weight, as 2048 x 2048 ones do
        extra = dict(extra, in_place_min_numel=0)
    banked, opt = _run(cls, True, dtype=dtype, preset=preset, **extra)
    single, ref = _run(cls, False, dtype=dtype, preset=preset, **extra)
    assert opt.banks.sizes() == [1, 2, 3, 3]  # the three same-shape families, and the (16, 24) loner on its own
    assert ref.banks.sizes() == [1] * len(SHAPES)  # foreach=False: every matrix is a bank of one
    for a, b in zip(banked, single):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(_state_tensors(opt), _state_tensors(ref)):
        assert torch.equal(a, b), name


def test_bank_state_is_per_matrix_on_disk_and_resumes_bit_exactly():
    """A checkpoint of banked state holds the per-matrix tensors (sharing storage); it loads with
    weights_only=True into a banked or a per-matrix optimizer, and a per-matrix checkpoint (the layout
    from before banks) loads into a banked one; each resume equals the straight run bit for bit."""
    straight, _ = _run(sara_ds.SaraAdamW, True, steps=8, preset="sara_fira")
    for saver, loader in ((True, True), (True, False), (False, True)):
        weights, opt = _run(sara_ds.SaraAdamW, saver, steps=4, preset="sara_fira")
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        for st in loaded["state"].values():
            if "basis" in st:
                assert st["basis"].shape in ((24, 4), (16, 4)) and st["exp_avg"].dim() == 2
        resumed, _ = _run(sara_ds.SaraAdamW, loader, steps=8, state=(weights, loaded), start=4, preset="sara_fira")
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b), (saver, loader)


def test_a_moment_reset_restacks_the_bank():
    _, opt = _run(sara_ds.SaraAdamW, True, steps=4, subspace="importance", moments_on_refresh="reset")
    for bank in opt.banks:  # the refresh at step 3 replaced the moments; step 3 restacked
        for i, st in enumerate(bank.states):
            assert st["exp_avg"].untyped_storage().data_ptr() == bank.stacked["exp_avg"].untyped_storage().data_ptr()


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def ordinary_step_ops(cls, n_matrices, foreach=True, **options):
    """Dispatched ops and host syncs of one ordinary step (not a refresh) with n same-shape matrices."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 96) * 0.1) for _ in range(n_matrices)]
    opt = cls([dict(params=weights, rank=8, update_proj_gap=10)], lr=1e-2, weight_decay=0.1, foreach=foreach,
              **options)
    for _ in range(2):  # the refresh at 0, then one ordinary step that builds the banks
        for w in weights:
            w.grad = torch.randn_like(w)
        opt.step()
    counter = CountOps()
    with counter:
        opt.step()
    return counter.ops, counter.syncs


@pytest.mark.parametrize("cls,preset", [(sara_ds.SaraAdamW, "sara"), (sara_ds.SaraAdamW, "sara_fira"),
                                        (sara_ds.SaraAdafactor, "sara"), (sara_ds.SaraAdamMini, "sara")])
@pytest.mark.parametrize("flag", ["host", "device"])
def test_an_ordinary_step_dispatches_per_bank_not_per_matrix(cls, preset, flag):
    (few, syncs_few), (many, syncs_many) = (ordinary_step_ops(cls, n, preset=preset, finite_flag=flag) for n in (4, 32))
    (loop_few, _), (loop_many, _) = (ordinary_step_ops(cls, n, foreach=False, preset=preset, finite_flag=flag)
                                     for n in (4, 32))
    print(f"\n{cls.__name__} {preset} finite_flag={flag}: banks {few} -> {many} ops, per-matrix {loop_few} -> "
          f"{loop_many} (4 -> 32 matrices); host syncs {syncs_few}, {syncs_many}")
    assert many <= 1.5 * few
    assert loop_many > 3 * loop_few  # the per-matrix path, which the bound above would catch
    assert syncs_few == syncs_many == (1 if flag == "host" else 0)  # the step's finite flag, read or not


class WeightSizedAllocations(TorchDispatchMode):
    """Ops whose output is new storage (not a view, not in place) with as many elements as a weight."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.found = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.found.append(str(func))
        return out


@pytest.mark.parametrize("cls,preset", [(sara_ds.SaraAdamW, "sara"), (sara_ds.SaraAdamW, "galore"),
                                        (sara_ds.SaraAdafactor, "sara"), (sara_ds.SaraAdamMini, "sara")])
@pytest.mark.parametrize("foreach", [True, False], ids=["banks", "per-matrix"])
@pytest.mark.parametrize("flag", ["host", "device"])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)], ids=["left", "right"])
def test_in_place_steps_allocate_nothing_the_size_of_a_weight(cls, preset, foreach, flag, shape):
    """At or above in_place_min_numel, B N and the decay go into the weight with addmm_ and a multiply: an
    ordinary step makes no m x n temporary (below it, the update path makes one per matrix: the control)."""
    def ordinary_step(min_numel):
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(*shape)) for _ in range(3)]
        opt = cls([dict(params=weights, rank=4, update_proj_gap=10)], lr=1e-2, weight_decay=0.1, preset=preset,
                  foreach=foreach, finite_flag=flag, in_place_min_numel=min_numel)
        for step in range(3):
            for w in weights:
                w.grad = torch.randn(*shape)
            before = [w.detach().clone() for w in weights]
            seen = WeightSizedAllocations(shape[0] * shape[1])
            with seen:
                opt.step()
        assert all(not torch.equal(b, w.detach()) for b, w in zip(before, weights))
        return seen.found

    assert ordinary_step(shape[0] * shape[1]) == []
    assert ordinary_step(shape[0] * shape[1] + 1)  # one element short of the threshold: the update path


@pytest.mark.parametrize("cls,preset", [(sara_ds.SaraAdamW, "sara"), (sara_ds.SaraAdafactor, "sara"),
                                        (sara_ds.SaraAdamMini, "sara")])
def test_in_place_steps_equal_the_update_path_to_round_off(cls, preset):
    """The same step, added by addmm_ into the weight instead of formed, scaled and then added: 7 steps, two
    refreshes. Both round the scaled product before the add; only the GEMM's order of summation may differ."""
    in_place, _ = _run(cls, True, preset=preset, in_place_min_numel=0)
    update, _ = _run(cls, True, preset=preset)
    diff = max((a - b).abs().max().item() for a, b in zip(in_place, update))
    print(f"\n{cls.__name__}: max|in place - update| = {diff:.1e}")
    assert diff < 1e-6


def test_the_default_banks_only_gpu_gradients():
    """foreach=None follows torch's optimizers: batched on CUDA, one by one on a CPU (measured faster there)."""
    _, opt = _run(sara_ds.SaraAdamW, None, steps=2, preset="sara")
    assert set(opt.banks.sizes()) == {1}
    if torch.cuda.is_available():
        w = [torch.nn.Parameter(torch.randn(24, 40, device="cuda")) for _ in range(2)]
        opt = sara_ds.SaraAdamW([dict(params=w, rank=4)])
        for _ in range(2):
            for p in w:
                p.grad = torch.randn_like(p)
            opt.step()
        assert opt.banks.sizes() == [2]


@pytest.mark.parametrize("spectrum", ["svd", "gram"])
@pytest.mark.parametrize("preset", ["sara", "galore", "grasswalk", "golore"])
def test_a_batched_refresh_chooses_the_per_matrix_basis_and_reads_back_once_per_batch(monkeypatch, spectrum, preset):
    """With foreach=True, same-shape matrices whose rule reads a spectrum take one batched SVD (or gram-eigh) per
    refresh, and read their singular values, then their overlaps, back to the host once per batch (through
    functional.to_host); the bases, moments and weights are the per-matrix refresh's, bit for bit."""
    reads = []
    real = sara_ds.functional.to_host
    monkeypatch.setattr(sara_ds.functional, "to_host", lambda t: reads.append(tuple(t.shape)) or real(t))
    batched, opt = _run(sara_ds.SaraAdamW, True, steps=4, preset=preset, spectrum=spectrum)  # refreshes at 0 and 3
    monkeypatch.setattr(sara_ds.functional, "to_host", real)
    single, ref = _run(sara_ds.SaraAdamW, False, steps=4, preset=preset, spectrum=spectrum)
    assert all(torch.equal(a, b) for a, b in zip(batched, single))
    for (name, a), (_, b) in zip(_state_tensors(opt), _state_tensors(ref)):
        assert torch.equal(a, b), name
    assert opt.subspace_overlaps() == ref.subspace_overlaps()
    batches = 4  # (24, 40) x3, (40, 24) x3, (24, 24) x2 and the (16, 24) loner
    if preset == "golore":  # random draws: no spectrum at any refresh; the overlaps at 3
        assert len(reads) == batches
    elif preset == "grasswalk":  # its SVD start; later refreshes walk, and read their overlaps
        assert len(reads) == 2 * batches
    else:  # the start (singular values), then the refresh at 3 (singular values and overlaps)
        assert len(reads) == 3 * batches and {s[0] for s in reads} == {1, 2, 3}
