"""SaraAdamW / SaraAdafactor / SaraAdamMini: resume, state, metrics, edge cases, errors."""
import copy
import io
import math
import warnings

import pytest
import torch

import sara_ds
from sara_ds import llama, reference
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


@pytest.mark.parametrize("rule", ["dominant", "importance"])
@pytest.mark.parametrize("fira", [False, True])
@pytest.mark.parametrize("moments", ["keep", "reset", "transport"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (9, 9)])
def test_agrees_with_the_reference_implementation(rule, fira, moments, shape):
    torch.manual_seed(0)
    initial = torch.randn(*shape)
    w = torch.nn.Parameter(initial.clone())
    grads = [torch.randn(*shape) * (1 + 0.3 * t) for t in range(10)]
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=3, update_proj_gap=4, scale=0.5)], lr=0.05, weight_decay=0.01,
                            subspace=rule, residual="fira" if fira else None, moments_on_refresh=moments, seed=11)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    expected = reference.reference_run(initial, grads,
                                       rank=3, gap=4, scale=0.5, lr=0.05, weight_decay=0.01, rule=rule, fira=fira,
                                       moments=moments, seed=11)
    assert torch.allclose(w.detach(), expected, atol=2e-6), (w.detach() - expected).abs().max()


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
    assert opt.state[w]["basis"].shape == (5, 5)


def test_zero_and_rank_deficient_gradients_do_not_poison_state():
    w = torch.nn.Parameter(torch.randn(10, 14))
    before = w.detach().clone()
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=4, update_proj_gap=1)], preset="sara_fira")
    w.grad = torch.zeros(10, 14)
    opt.step()
    assert torch.equal(w.detach(), before)
    w.grad = torch.outer(torch.randn(10), torch.randn(14))  # rank 1 < r = 4
    opt.step()
    st = opt.state[w]
    assert all(torch.isfinite(t).all() for k, t in st.items() if isinstance(t, torch.Tensor) and k != "fira_norm")
    assert torch.allclose(st["basis"].T @ st["basis"], torch.eye(4), atol=1e-5)


def test_nonfinite_gradient_skips_refresh_and_update_and_counts_it():
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=3, update_proj_gap=2)])
    w.grad = torch.randn(8, 12)
    opt.step()
    basis, weights = opt.state[w]["basis"].clone(), w.detach().clone()
    for bad in (float("nan"), float("inf")):
        g = torch.randn(8, 12)
        g[2, 3] = bad
        w.grad = g
        opt.step()  # step index 1, then 1 again: no refresh, update skipped
    w.grad = torch.randn(8, 12)
    opt.step()  # step 1 -> 2
    g = torch.randn(8, 12)
    g[0, 0] = float("nan")
    w.grad = g
    opt.step()  # step 2 is a refresh: skipped, old basis kept, update skipped
    st = opt.state[w]
    assert torch.equal(st["basis"], basis) and st["refresh_skips"] == 1 and st["nonfinite_skips"] == 3
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), weights)
    assert all(torch.isfinite(st[k]).all() for k in ("exp_avg", "exp_avg_sq"))


def test_nonfinite_gradient_before_any_basis():
    w = torch.nn.Parameter(torch.randn(6, 9))
    opt = sara_ds.SaraAdamW([dict(params=[w], rank=2)])
    w.grad = torch.full((6, 9), float("nan"))
    opt.step()
    assert torch.isfinite(w).all() and "basis" not in opt.state[w]
    w.grad = torch.randn(6, 9)
    opt.step()
    assert opt.state[w]["basis"].shape == (6, 2)


def test_one_d_and_conv_parameters_in_a_projected_group():
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = sara_ds.SaraAdamW([dict(params=list(conv.parameters()), rank=4)], lr=1e-2)
    conv(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert opt.state[conv.weight]["basis"].shape == (8, 4)  # (8, 27) projected on its 8-row side
    assert "basis" not in opt.state[conv.bias]


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
    assert len(overlaps) == 3 and all(0.0 <= v <= 1.0 + 1e-6 for v in overlaps.values())


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
