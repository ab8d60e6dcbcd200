"""The step's finite flag kept on the device (``finite_flag='device'``, the default for CUDA gradients).

An ordinary step (no refresh, no state to create) must read nothing back to the host: no
``aten._local_scalar_dense``, for every preset and base, banked or not. Where every gradient is finite it
is the host flag's step bit for bit. Where one is not, weights and optimizer state stay as they were and
the step counts advance (the documented difference from ``'host'``, where a skipped step is as if it had
never been called). A step that refreshes or creates state decides on the host in both modes.
"""
import io
from types import SimpleNamespace

import pytest
import torch
from counting_dist import HostReads

import sara_ds

SHAPES = [(24, 40)] * 3 + [(40, 24)] * 2 + [(16, 24)]
GAP = 3  # refreshes at calls 0, 3, 6; calls 1, 2, 4, 5 are ordinary steps


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    weights = [torch.nn.Parameter((torch.randn(s) * 0.1).to(dtype)) for s in SHAPES]
    vectors = [torch.nn.Parameter((torch.randn(24) * 0.1).to(dtype)) for _ in range(3)]
    return weights, vectors


def _optimizer(cls, weights, vectors, **options):
    return cls([dict(params=weights, rank=4, update_proj_gap=GAP), dict(params=vectors)], lr=1e-2,
               weight_decay=0.1, **options)


def _grads(params, step, dtype, poison=None):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    if poison is not None:
        which, value = poison
        params[which].grad.view(-1)[5] = value


def _state_tensors(opt):
    return [(k, v.clone()) for st in opt.state.values() for k, v in sorted(st.items()) if isinstance(v, torch.Tensor)]


def _run(cls, flag, steps=8, dtype=torch.float32, poison_at=None, poison=None, **options):
    weights, vectors = _model(dtype)
    opt = _optimizer(cls, weights, vectors, finite_flag=flag, **options)
    reads, trace = [], []
    for step in range(steps):
        _grads(weights + vectors, step, dtype, poison if step == poison_at else None)
        before = ([p.detach().clone() for p in weights + vectors], _state_tensors(opt))
        with HostReads() as host:
            opt.step()
        reads.append(host.count)
        trace.append(before)
    return [p.detach().clone() for p in weights + vectors], opt, reads, trace


CASES = [(sara_ds.SaraAdamW, dict(preset=p)) for p in sorted(sara_ds.PRESETS)]
CASES += [(sara_ds.SaraAdamW, dict(preset="sara", fused=True)),
          (sara_ds.SaraAdamW, dict(subspace="importance", moments_on_refresh="reset")),
          (sara_ds.SaraAdafactor, dict(preset="sara")), (sara_ds.SaraAdafactor, dict(preset="sara_fira", beta1=0.9)),
          (sara_ds.SaraAdamMini, dict(preset="sara")), (sara_ds.SaraAdamMini, dict(preset="fira"))]
IN_PLACE = [(sara_ds.SaraAdamW, dict(preset="sara", in_place_min_numel=0)),  # addmm_ into the weight, decay by multiply
            (sara_ds.SaraAdafactor, dict(preset="sara", in_place_min_numel=0))]
CASES += IN_PLACE


def _case_id(case):
    cls, options = case
    return f"{cls.__name__}-" + "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("foreach", [True, False], ids=["banks", "per-matrix"])
def test_the_device_flag_is_the_host_flag_bit_for_bit_with_no_host_read_in_an_ordinary_step(case, foreach):
    cls, options = case
    on_device, opt, reads, _ = _run(cls, "device", foreach=foreach, **options)
    on_host, ref, host_reads, _ = _run(cls, "host", foreach=foreach, **options)
    for a, b in zip(on_device, on_host):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(_state_tensors(opt), _state_tensors(ref)):
        assert torch.equal(a, b), name
    # OSD computes its basis at the start and then steps it; every GAP of its steps it reads the overlap metric
    refreshes = set(range(0, 8, GAP)) if options.get("preset") != "osd" else {0, GAP - 1, 2 * GAP - 1}
    ordinary = [n for step, n in enumerate(reads) if step not in refreshes]
    assert ordinary == [0] * len(ordinary), reads
    assert [n for step, n in enumerate(host_reads) if step not in refreshes] == [1] * len(ordinary)  # the control
    assert opt.refresh_counts() == ref.refresh_counts()


@pytest.mark.parametrize("case", CASES[:1] + CASES[-4:], ids=_case_id)
def test_the_device_flag_in_bf16(case):
    cls, options = case
    on_device, _, reads, _ = _run(cls, "device", dtype=torch.bfloat16, foreach=True, **options)
    on_host, _, _, _ = _run(cls, "host", dtype=torch.bfloat16, foreach=True, **options)
    assert all(torch.equal(a, b) for a, b in zip(on_device, on_host))
    assert [reads[s] for s in (1, 2, 4, 5, 7)] == [0] * 5


@pytest.mark.parametrize("where", [0, 4, len(SHAPES) + 1], ids=["bank-member", "loner", "full-rank"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_nonfinite_bf16_gradient_is_skipped_on_the_device(where, bad):
    """bf16 gradients take max |g| instead of GradScaler's kernel, which CUDA does not implement for bf16."""
    _, opt, reads, trace = _run(sara_ds.SaraAdamW, "device", dtype=torch.bfloat16, steps=6, poison_at=4,
                                poison=(where, bad), preset="sara", foreach=True)
    assert reads[4] == 0
    assert all(torch.equal(a, b) for a, b in zip(trace[4][0], trace[5][0]))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(trace[4][1], trace[5][1]))
    assert opt.refresh_counts()["skipped_steps"] == 1


@pytest.mark.parametrize("case", [CASES[i] for i in (5, 6, 8, 10, 11, 12)] + IN_PLACE, ids=_case_id)
@pytest.mark.parametrize("foreach", [True, False], ids=["banks", "per-matrix"])
@pytest.mark.parametrize("where", [0, 4, len(SHAPES) + 1], ids=["bank-member", "loner", "full-rank"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_step_the_device_flag_skips_moves_nothing_and_still_counts(case, foreach, where, bad):
    cls, options = case
    _, opt, reads, trace = _run(cls, "device", steps=6, foreach=foreach, poison_at=4, poison=(where, bad), **options)
    weights_before, state_before = trace[4]
    weights_after, state_after = trace[5]  # taken just before call 5: what call 4 left
    assert reads[4] == 0  # skipped without reading anything back
    assert all(torch.equal(a, b) for a, b in zip(weights_before, weights_after))
    for (name, a), (_, b) in zip(state_before, state_after):
        assert torch.equal(a, b), name  # moments, bases, Fira norms: untouched
    projected = [st for st in opt.state.values() if "basis" in st]
    assert all(st["step"] == 6 for st in projected)  # call 4 counted
    assert opt.refresh_counts()["skipped_steps"] == 1
    final, _, _, _ = _run(cls, "device", steps=6, foreach=foreach, poison_at=4, poison=(where, bad), **options)
    assert all(torch.isfinite(p).all() for p in final)


@pytest.mark.parametrize("foreach", [True, False], ids=["banks", "per-matrix"])
def test_a_nonfinite_refresh_step_is_decided_on_the_host_and_not_counted(foreach):
    options = dict(preset="sara_fira", foreach=foreach)
    skipped, opt, reads, trace = _run(sara_ds.SaraAdamW, "device", steps=7, poison_at=3, poison=(0, float("nan")),
                                      **options)
    assert reads[3] >= 1  # the flag, read on the host before any SVD
    assert all(torch.equal(a, b) for a, b in zip(trace[3][0], trace[4][0]))
    # as with finite_flag='host': the refresh step is retried at the next call, and nothing else changed
    on_host, _, _, _ = _run(sara_ds.SaraAdamW, "host", steps=7, poison_at=3, poison=(0, float("nan")), **options)
    assert all(torch.equal(a, b) for a, b in zip(skipped, on_host))
    assert opt.refresh_counts()["skipped_steps"] == 1


def test_skips_counted_on_the_device_are_saved_in_the_checkpoint():
    weights, vectors = _model()
    opt = _optimizer(sara_ds.SaraAdamW, weights, vectors, finite_flag="device", preset="sara")
    for step in range(6):
        _grads(weights + vectors, step, torch.float32, (1, float("nan")) if step in (1, 4) else None)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # state_dict() adds the pending count before it is saved
    buffer.seek(0)
    fresh = _optimizer(sara_ds.SaraAdamW, *_model(), finite_flag="device", preset="sara")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.refresh_counts()["skipped_steps"] == 2 and opt.refresh_counts()["skipped_steps"] == 2


def test_a_huge_finite_gradient_is_stepped_by_the_device_flag():
    weights, vectors = _model()
    opt = _optimizer(sara_ds.SaraAdamW, weights, vectors, finite_flag="device", preset="sara")
    for step in range(3):
        _grads(weights + vectors, step, torch.float32, (0, 1e20) if step == 2 else None)
        before = weights[0].detach().clone()
        opt.step()
    assert opt.refresh_counts()["skipped_steps"] == 0 and not torch.equal(before, weights[0])
    assert all(torch.isfinite(p).all() for p in weights + vectors)


def test_full_rank_only_model_creates_state_on_the_host_then_steps_on_the_device():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    opt = sara_ds.SaraAdamW(params, lr=1e-2, finite_flag="device")
    reads = []
    for step in range(4):
        _grads(params, step, torch.float32, (2, float("nan")) if step == 0 else None)
        with HostReads() as host:
            opt.step()
        reads.append(host.count)
        if step == 0:  # the first step found the NaN on the host: no state was made
            assert reads[0] > 0 and not opt.state_of(params[0])
    assert reads[2:] == [0, 0] and opt.state_of(params[0])["step"] == 3 and opt.refresh_counts()["skipped_steps"] == 1


def test_finite_flag_values_are_checked():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"finite_flag must be one of .* got finite_flag='gpu'"):
        sara_ds.SaraAdamW([w], finite_flag="gpu")
    with pytest.raises(ValueError, match=r"finite_flag must be the same in every param group"):
        sara_ds.SaraAdamW([dict(params=[w], finite_flag="host"), dict(params=[torch.nn.Parameter(torch.randn(3))])],
                          finite_flag="device")


def test_cuda_gradients_use_the_device_flag_by_default():
    weights, vectors = _model()
    opt = _optimizer(sara_ds.SaraAdamW, weights, vectors)
    flag = opt.param_groups[0]["finite_flag"]
    assert flag is None and not sara_ds.functional.flag_on_device(flag, [weights[0].detach()])
    if torch.cuda.is_available():
        assert sara_ds.functional.flag_on_device(flag, [weights[0].detach().cuda()])


def test_where_owners_step_different_matrices_the_host_decides_and_the_device_flag_is_refused_by_name():
    """FSDP2's owners: a rank with no matrix due for a refresh would take the device path beside peers on the
    host path, and a NaN at that step would leave them in different collectives (tests/test_fsdp2.py: the run)."""
    cuda_grads = [SimpleNamespace(is_cuda=True)]  # all the choice reads of a gradient
    assert sara_ds.functional.flag_on_device(None, cuda_grads)
    assert not sara_ds.functional.flag_on_device(None, cuda_grads, "FSDP2Layout")
    assert not sara_ds.functional.flag_on_device("host", cuda_grads, "FSDP2Layout")
    with pytest.raises(ValueError, match=r"finite_flag='device' needs every rank .* under FSDP2Layout .* Use "
                                         r"finite_flag=None"):
        sara_ds.functional.flag_on_device("device", cuda_grads, "FSDP2Layout")
