"""SaraAdamW / SaraAdafactor / SaraAdamMini: resume, state, metrics, edge cases, errors."""
import copy
import io
import math
import warnings

import pytest
import torch

import sara_ds
from sara_ds import reference
from sara_bench import llama
from conftest import batch, galore_groups, train

CLASSES = [sara_ds.SaraAdamW, sara_ds.SaraAdafactor, sara_ds.SaraAdamMini]


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("preset", sorted(sara_ds.PRESETS))
def test_resume_is_bit_exact_across_a_refresh(shapes_net, cls, preset):
    straight = copy.deepcopy(shapes_net)
    opt = cls(galore_groups(straight), lr=1e-2, preset=preset, seed=3)
    train(straight, opt, 8)

    first = copy.deepcopy(shapes_net)
    opt1 = cls(galore_groups(first), lr=1e-2, preset=preset, seed=3)
    train(first, opt1, 5)  # refreshes at 0 and 3; the next at 6 happens after resume
    saved_model, saved_opt = _roundtrip(first.state_dict()), _roundtrip(opt1.state_dict())

    resumed = copy.deepcopy(shapes_net)
    resumed.load_state_dict(saved_model)
    opt2 = cls(galore_groups(resumed), lr=1e-2, preset=preset, seed=3)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 3, start=5)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_state_holds_only_plain_values(shapes_net, cls):
    opt = cls(galore_groups(shapes_net), lr=1e-2, preset="grasswalk")
    train(shapes_net, opt, 4)

    def check(v, where):
        if isinstance(v, dict):
            for k, x in v.items():
                check(x, f"{where}/{k}")
        else:
            assert isinstance(v, (torch.Tensor, int, float, bool)), f"{where}: {type(v).__name__}"

    check(opt.state_dict()["state"], "state")


REFERENCE_CASES = [(rule, fira, moments, shape, True) for rule in ("dominant", "importance") for fira in (False, True)
                   for moments in ("keep", "reset", "transport") for shape in ((12, 20), (20, 12), (9, 9))]
REFERENCE_CASES += [(rule, False, "keep", shape, False) for rule in ("dominant", "importance")
                    for shape in ((12, 20), (20, 12))]  # correct_bias=False only changes the step size


@pytest.mark.parametrize("rule,fira,moments,shape,correct_bias", REFERENCE_CASES)
def test_agrees_with_the_reference_implementation(rule, fira, moments, shape, correct_bias):
    torch.manual_seed(0)
    initial = torch.randn(*shape)
    w = torch.nn.Parameter(initial.clone())
    grads = [torch.randn(*shape) * (1 + 0.3 * t) for t in range(10)]
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=3, update_proj_gap=4, scale=0.5)], lr=0.05, weight_decay=0.01,
                            subspace=rule, residual="fira" if fira else None, moments_on_refresh=moments, seed=11,
                            correct_bias=correct_bias)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    expected = reference.reference_run(initial, grads,
                                       rank=3, gap=4, scale=0.5, lr=0.05, weight_decay=0.01, rule=rule, fira=fira,
                                       moments=moments, seed=11, correct_bias=correct_bias)
    assert torch.allclose(w.detach(), expected, atol=2e-6), (w.detach() - expected).abs().max()


def test_correct_bias_false_on_a_full_rank_parameter():
    """Without bias correction the first AdamW step is (1-b1) g / (sqrt((1-b2) g^2) + eps), about 3.16 sign(g)."""
    b = torch.nn.Parameter(torch.zeros(7))
    g = torch.linspace(-3, 3, 7)
    opt = sara_ds.SaraAdamW([{"params": [b]}], lr=0.1, betas=(0.9, 0.999), eps=1e-6, correct_bias=False)
    b.grad = g.clone()
    opt.step()
    expected = -0.1 * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6)
    assert torch.allclose(b.detach(), expected, rtol=1e-6, atol=1e-7)
    assert b.detach()[0].item() > 0.3  # g[0] = -3: a step of 3.16 lr up, not the bias-corrected 1.0 lr


def test_state_bytes_equal_the_analytic_figure():
    torch.manual_seed(0)
    shapes = [(64, 172), (172, 64), (64, 64)]
    ws = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    bias = torch.nn.Parameter(torch.randn(64))
    r = 8
    for preset, extra in (("sara", 0), ("fira", 1)):
        opt = sara_ds.SaraAdamW([{"params": [bias]}, dict(params=ws, rank=r)], preset=preset)
        for p in ws + [bias]:
            p.grad = torch.randn_like(p)
        opt.step()
        analytic = sum(r * (min(s) + 2 * max(s)) + extra for s in shapes) + 2 * bias.numel()
        assert opt.state_bytes() == 4 * analytic


def test_rank_above_min_dim_is_clamped_with_one_warning_per_matrix():
    w = torch.nn.Parameter(torch.randn(5, 9))
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=7, update_proj_gap=2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            w.grad = torch.randn(5, 9)
            opt.step()
    messages = [str(c.message) for c in caught if "exceeds min(m, n)" in str(c.message)]
    assert len(messages) == 1 and "rank=7" in messages[0]
    assert opt.state_of(w)["basis"].shape == (5, 5)


def test_zero_and_rank_deficient_gradients_do_not_poison_state():
    w = torch.nn.Parameter(torch.randn(10, 14))
    before = w.detach().clone()
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=4, update_proj_gap=1)], preset="sara_fira")
    w.grad = torch.zeros(10, 14)
    opt.step()
    assert torch.equal(w.detach(), before)
    w.grad = torch.outer(torch.randn(10), torch.randn(14))  # rank 1 < r = 4
    opt.step()
    st = opt.state_of(w)
    assert all(torch.isfinite(t).all() for k, t in st.items() if isinstance(t, torch.Tensor) and k != "fira_norm")
    assert torch.allclose(st["basis"].T @ st["basis"], torch.eye(4), atol=1e-5)


def _assert_same_state(a, b, where="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def _poisoned_grads(model, where, bad):
    grad = {"full_rank": model.gain.grad, "projected": model.mlp_tall.weight.grad}[where]
    grad.view(-1)[3] = bad


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("where", ["full_rank", "projected"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_nonfinite_gradient_anywhere_skips_the_whole_step(shapes_net, cls, where, bad):
    straight = copy.deepcopy(shapes_net)
    opt = cls(galore_groups(straight), lr=1e-2, preset="sara_fira", seed=3)
    train(straight, opt, 8)

    model = copy.deepcopy(shapes_net)
    opt2 = cls(galore_groups(model), lr=1e-2, preset="sara_fira", seed=3)
    for t in range(8):
        if t in (1, 3):  # 3 is a refresh step (T = 3): a poisoned step must not refresh either
            weights = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(opt2.state_dict())
            x, y = batch(t)
            opt2.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            _poisoned_grads(model, where, bad)
            opt2.step()
            for before, p in zip(weights, model.parameters()):
                assert torch.equal(before, p.detach())  # nothing moved, the other kind of parameter neither
            after = opt2.state_dict()
            assert after["param_groups"][0]["skipped_steps"] == state["param_groups"][0]["skipped_steps"] + 1
            for g in after["param_groups"] + state["param_groups"]:
                g.pop("skipped_steps")
            _assert_same_state(state, after)  # no moment, basis or counter changed
        train(model, opt2, 1, start=t)
    # a skipped step is as if it had never been taken
    for (name, a), b in zip(straight.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert opt2.refresh_counts() == {"refreshes": opt.refresh_counts()["refreshes"], "skipped_steps": 2}
    # the count is part of the checkpoint
    opt3 = cls(galore_groups(copy.deepcopy(model)), lr=1e-2, preset="sara_fira", seed=3)
    opt3.load_state_dict(_roundtrip(opt2.state_dict()))
    assert opt3.refresh_counts()["skipped_steps"] == 2


@pytest.mark.parametrize("where", ["full_rank", "projected"])
def test_a_huge_finite_gradient_is_stepped_not_skipped(shapes_net, where):
    """1e20 squares to inf in fp32, so the fast 2-norm check flags it; the exact max |g| must clear it."""
    model = copy.deepcopy(shapes_net)
    opt = sara_ds.SaraAdamW(galore_groups(model), lr=1e-2, preset="sara", seed=3)
    train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(2)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    _poisoned_grads(model, where, 1e20)
    opt.step()
    assert opt.refresh_counts()["skipped_steps"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))


def test_nonfinite_gradient_before_any_basis():
    w = torch.nn.Parameter(torch.randn(6, 9))
    before = w.detach().clone()
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=2)])
    w.grad = torch.full((6, 9), float("nan"))
    opt.step()
    assert torch.equal(w.detach(), before) and not opt.state_of(w) and opt.refresh_counts()["skipped_steps"] == 1
    w.grad = torch.randn(6, 9)
    opt.step()
    assert opt.state_of(w)["basis"].shape == (6, 2) and opt.refresh_counts() == {"refreshes": 1, "skipped_steps": 1}


LOW_PRECISION = [(torch.bfloat16, cls, p) for cls in CLASSES for p in sorted(sara_ds.PRESETS)]
LOW_PRECISION += [(torch.float16, cls, "sara") for cls in CLASSES]


@pytest.mark.parametrize("dtype,cls,preset", LOW_PRECISION,
                         ids=[f"{str(d)[6:]}-{c.__name__}-{p}" for d, c, p in LOW_PRECISION])
def test_low_precision_weights_resume_bit_exactly(shapes_net, dtype, cls, preset):
    """model.to(bf16), GaLore's own single-GPU recipe: torch's load_state_dict casts state to the
    parameter's dtype; the optimizer's state (fp32 by design) must come back fp32 and continue exactly."""
    net = shapes_net.to(dtype)
    straight = copy.deepcopy(net)
    opt = cls(galore_groups(straight), lr=1e-2, preset=preset, seed=3)
    train(straight, opt, 8, dtype=dtype)

    first = copy.deepcopy(net)
    opt1 = cls(galore_groups(first), lr=1e-2, preset=preset, seed=3)
    train(first, opt1, 5, dtype=dtype)  # refreshes at 0 and 3; the next at 6 happens after resume
    saved_model, saved_opt = _roundtrip(first.state_dict()), _roundtrip(opt1.state_dict())

    resumed = copy.deepcopy(net)
    resumed.load_state_dict(saved_model)
    opt2 = cls(galore_groups(resumed), lr=1e-2, preset=preset, seed=3)
    opt2.load_state_dict(saved_opt)
    floating = [t for t in _tensors(opt2.state) if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float32 for t in floating)
    train(resumed, opt2, 3, start=5, dtype=dtype)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert a.dtype == dtype and torch.equal(a, b), name
    assert opt2.refresh_counts()["refreshes"] == opt.refresh_counts()["refreshes"] == 3 * (1 if preset == "osd" else 3)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def test_one_d_and_conv_parameters_in_a_projected_group():
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = sara_ds.SaraAdamW([dict(params=list(conv.parameters()), rank=4)], lr=1e-2)
    conv(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert opt.state_of(conv.weight)["basis"].shape == (8, 4)  # (8, 27) projected on its 8-row side
    assert "basis" not in opt.state_of(conv.bias)


def test_param_groups_follow_the_paper_rule_and_overrides():
    model = llama.Llama(llama.LlamaConfig(hidden=32, intermediate=88, heads=2, layers=2, vocab_size=50))
    groups = sara_ds.param_groups(model, rank=8)
    projected = groups[1]["param_names"]
    assert len(projected) == 2 * 7 and all(("attn." in n or "mlp." in n) and n.endswith("weight") for n in projected)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in projected)
    only_mlp = sara_ds.param_groups(model, rank=8, include=["mlp"], exclude=[r"down_proj"])
    assert len(only_mlp[1]["param_names"]) == 2 * 2
    with pytest.raises(ValueError, match="no parameter matched"):
        sara_ds.param_groups(model, rank=8, include=["nothing_here"])


def test_subspace_overlap_is_reported_per_matrix(shapes_net):
    model = copy.deepcopy(shapes_net)
    opt = sara_ds.SaraAdamW(galore_groups(model), lr=1e-2)
    train(model, opt, 2)
    assert all(math.isnan(v) for v in opt.subspace_overlaps().values())
    train(model, opt, 3, start=2)
    overlaps = opt.subspace_overlaps()
    assert len(overlaps) == 3
    for w, name in ((model.attn_square.weight, "param3"), (model.mlp_tall.weight, "param4"),
                    (model.mlp_wide.weight, "param5")):  # the value is ||B_old^T B_new||_F^2 / r of the last refresh
        st = opt.state_of(w)
        assert st["refreshes"] == 2
    # recompute it from the bases the optimizer holds: keep a copy of the old basis, refresh once more
    old = {i: st["basis"].clone() for i, st in opt.matrix_states()}
    train(model, opt, 3, start=5)
    for i, st in opt.matrix_states():
        expected = (old[i].T @ st["basis"]).square().sum().item() / st["basis"].shape[1]
        assert math.isclose(opt.subspace_overlaps()[opt.param_names[i]], expected, rel_tol=1e-5)


BAD = [
    (dict(lr=-1e-3), "lr=-0.001"),
    (dict(betas=(1.0, 0.999)), "betas[0]=1.0"),
    (dict(betas=(0.9, -0.1)), "betas[1]=-0.1"),
    (dict(subspace="topk"), "subspace='topk'"),
    (dict(residual="lora"), "residual='lora'"),
    (dict(moments_on_refresh="drop"), "moments_on_refresh='drop'"),
    (dict(preset="adam"), "preset='adam'"),
    (dict(preset="galore", subspace="importance"), "subspace='importance'"),
    (dict(seed=-1), "seed=-1"),
    (dict(eps=-1.0), "eps=-1.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(foreach="yes"), "foreach='yes'"),
]
BAD_GROUP = [
    (dict(rank=0), "rank=0"),
    (dict(rank=2.5), "rank=2.5"),
    (dict(update_proj_gap=0), "update_proj_gap=0"),
    (dict(scale=0.0), "scale=0.0"),
    (dict(scale=-1), "scale=-1"),
    (dict(proj_type="full"), "proj_type='full'"),
]


@pytest.mark.parametrize("kwargs,named", BAD, ids=[b[1] for b in BAD])
def test_bad_hyperparameters_are_named(kwargs, named):
    w = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError) as err:
        sara_ds.SaraAdamW([dict(params=[w], rank=2)], **kwargs)
    assert named in str(err.value)


@pytest.mark.parametrize("group,named", BAD_GROUP, ids=[b[1] for b in BAD_GROUP])
def test_bad_group_keys_are_named_with_their_group(group, named):
    w, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError) as err:
        sara_ds.SaraAdamW([{"params": [b]}, dict(params=[w], **{"rank": 2, **group})])
    assert named in str(err.value) and "param group 1" in str(err.value)


def test_bad_adafactor_keys_are_named():
    w = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match="decay_rate=0.5"):
        sara_ds.SaraAdafactor([dict(params=[w], rank=2)], decay_rate=0.5)
    with pytest.raises(ValueError, match="clip_threshold=0"):
        sara_ds.SaraAdafactor([dict(params=[w], rank=2)], clip_threshold=0)


def test_one_implementation_behind_the_three_public_names():
    """Each public name fixes its base and documented defaults; the subspace options are one shared record."""
    w = torch.nn.Parameter(torch.zeros(8, 8))
    expected = {sara_ds.SaraAdamW: ("adamw", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, correct_bias=True)),
                sara_ds.SaraAdafactor: ("adafactor", dict(lr=1e-2, beta1=None, decay_rate=-0.8, eps=1e-30,
                                                          clip_threshold=1.0)),
                sara_ds.SaraAdamMini: ("adam_mini", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8))}
    for cls, (base, defaults) in expected.items():
        opt = cls([dict(params=[w], rank=2)], preset="galore", spectrum="gram", seed=5)
        assert opt.base_name == base and opt.base.name == base
        group = opt.param_groups[0]
        assert {k: group[k] for k in defaults} == defaults, cls
        assert (group["subspace"], group["spectrum"], group["seed"], group["weight_decay"]) == ("dominant", "gram", 5, 0.0)
        with pytest.raises(TypeError, match=rf"sara_ds: {cls.__name__} got unknown option\(s\) \['spectrm'\]"):
            cls([w], spectrm="svd")


def _full_rank_run(foreach, n_tensors=6, dtype=torch.float32, steps=4, skip_one_at=None, fused=False):
    torch.manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(24, 32, dtype=dtype) * 0.1)
    vectors = [torch.nn.Parameter(torch.randn(32 + i, dtype=dtype) * 0.1) for i in range(n_tensors)]
    opt = sara_ds.SaraAdamW([dict(params=[matrix], rank=4, update_proj_gap=2), dict(params=vectors)], lr=1e-2,
                            weight_decay=0.1, foreach=foreach, fused=fused)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        matrix.grad = torch.randn(matrix.shape, generator=g).to(dtype)
        for i, v in enumerate(vectors):  # one vector misses a step: its step count falls behind the others'
            v.grad = None if (step == skip_one_at and i == 0) else torch.randn(v.shape, generator=g).to(dtype)
        opt.step()
    return [matrix.detach().clone()] + [v.detach().clone() for v in vectors], opt


def _per_tensor_adamw(dtype, n_tensors=6, steps=4, skip_one_at=None, lr=1e-2, weight_decay=0.1):
    """``_full_rank_run``'s vectors stepped one tensor at a time with the single-tensor rule
    (``updates.adamw_direction``), the step and the decoupled decay written out: the reference for the list kernels."""
    torch.manual_seed(0)
    torch.randn(24, 32, dtype=dtype)  # the matrix's draw
    vectors = [torch.randn(32 + i, dtype=dtype) * 0.1 for i in range(n_tensors)]
    states = [dict(exp_avg=torch.zeros(v.shape), exp_avg_sq=torch.zeros(v.shape), step=0) for v in vectors]
    hp = dict(betas=(0.9, 0.999), eps=1e-6, correct_bias=True)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        torch.randn((24, 32), generator=g)
        for i, (v, st) in enumerate(zip(vectors, states)):
            grad = None if (step == skip_one_at and i == 0) else torch.randn(v.shape, generator=g).to(dtype)
            if grad is None:
                continue
            st["step"] += 1
            direction, step_scale = sara_ds.updates.adamw_direction(grad.float(), st, hp, st["step"])
            v.add_(direction.to(dtype), alpha=-lr * step_scale)
            v.mul_(1.0 - lr * weight_decay)
    return vectors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skip_one_at", [None, 1])
@pytest.mark.parametrize("foreach", [True, False])
def test_the_full_rank_adamw_step_is_the_per_tensor_rule_bit_for_bit(dtype, skip_one_at, foreach):
    """Full-rank tensors go through torch's foreach kernels in lists of one step count; each must move as the
    single-tensor rule moves it, bit for bit (a tensor that missed a step is in another list)."""
    fast, opt = _full_rank_run(foreach, dtype=dtype, skip_one_at=skip_one_at)
    reference = _per_tensor_adamw(dtype, skip_one_at=skip_one_at)
    assert all(torch.equal(a, b) for a, b in zip(fast[1:], reference))
    steps = sorted(st["step"] for i, st in opt.state.items() if len(opt.matrices[i].shape) == 1)
    assert steps == ([3] + [4] * 5 if skip_one_at is not None else [4] * 6)


@pytest.mark.parametrize("skip_one_at", [None, 1])
def test_the_fused_full_rank_adamw_step_is_the_per_tensor_update(skip_one_at):
    """torch's fused kernel puts eps elsewhere; sara_ds rescales it, so the update is galore-torch's up to
    round-off (measured: 1.5e-8 on weights of size ~0.1 after 6 steps with decay). Without the rescaling
    the same run differs by 4.8e-4. bf16 weights do not fit the kernel and take the foreach path, bit for bit."""
    fused, opt = _full_rank_run(None, steps=6, fused=True, skip_one_at=skip_one_at)
    loop, _ = _full_rank_run(False, steps=6, skip_one_at=skip_one_at)
    diff = max((a - b).abs().max().item() for a, b in zip(fused[1:], loop[1:]))
    print(f"\nfused vs per-tensor full-rank AdamW: {diff:.1e}")
    assert diff < 1e-7 and torch.equal(fused[0], loop[0])  # the projected matrix is not touched by the kernel
    assert diff > 0  # the kernel really ran (a bit-identical result would mean the foreach path ran instead)
    low, _ = _full_rank_run(None, dtype=torch.bfloat16, fused=True)
    low_loop, _ = _full_rank_run(False, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(low, low_loop))


@pytest.mark.parametrize("cls,kwargs,named", [(sara_ds.SaraAdafactor, {}, "adafactor base"),
                                              (sara_ds.SaraAdamMini, {}, "adam_mini base"),
                                              (sara_ds.SaraAdamW, dict(correct_bias=False), "correct_bias=False")])
def test_fused_is_refused_where_torch_has_no_kernel_for_it(cls, kwargs, named):
    w = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=f"fused=True .* {named}"):
        cls([w], fused=True, **kwargs)


def test_the_full_rank_step_dispatches_per_group_not_per_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.ops += 1
            return func(*args, **(kwargs or {}))

    def ops_of_an_ordinary_step(n, foreach):
        _, opt = _full_rank_run(foreach, n_tensors=n, steps=3)  # refreshes at 0 and 2; step 3 is ordinary
        for m in opt.matrices:
            m.param.grad = torch.ones_like(m.param)
        CountOps.ops = 0
        with CountOps():
            opt.step()
        return CountOps.ops

    for foreach in (True, False):  # full-rank tensors always go through the list kernels; foreach banks matrices
        assert ops_of_an_ordinary_step(32, foreach) <= 1.5 * ops_of_an_ordinary_step(4, foreach)


def test_state_size_from_shapes_equals_the_state_built():
    """ZeRO-3 balances matrices by their state size before any state exists, and benchmarks/zero_memory.py's
    per-GPU formula (LLaMA-7B table) uses the same count: it must equal what the optimizer then builds, for every
    preset and base (Fira's norm, OSD's basis moments and anchor included)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from zero_memory import state_bytes, state_formula_bytes

    for cls in ("SaraAdamW", "SaraAdafactor", "SaraAdamMini"):
        for preset in sorted(sara_ds.PRESETS):
            torch.manual_seed(0)
            model = llama.Llama(llama.LlamaConfig(vocab_size=64, hidden=16, layers=2, heads=2, intermediate=48, max_seq=8))
            opt = sara_ds.OPTIMIZERS[cls](sara_ds.param_groups(model, rank=4, update_proj_gap=2), preset=preset,
                                          **({"osd_lr": 0.01} if preset == "osd" else {}))
            predicted = state_formula_bytes(opt)
            for _ in range(3):
                tokens = torch.randint(0, 64, (2, 9))
                opt.zero_grad()
                model(tokens[:, :-1], tokens[:, 1:]).backward()
                opt.step()
            assert predicted == state_bytes(opt), (cls, preset, predicted, state_bytes(opt))
