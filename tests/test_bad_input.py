"""What a user can get wrong: hyperparameters, param groups, checkpoints, damaged files and huge gradients. Each
gets an error that names the key, value, matrix or file, or a documented, finite outcome."""
import io
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sara_ds
from sara_ds import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(12, 20) * 0.1), torch.nn.Parameter(torch.randn(20, 8) * 0.1),
            torch.nn.Parameter(torch.randn(20) * 0.1)]


def _groups(params, **projected):
    return [dict(dict(params=params[:2], rank=4, update_proj_gap=2), **projected), dict(params=params[2:])]


def _train(opt, params, steps, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(10 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("key", ["lr", "eps", "weight_decay", "scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hyperparameters_are_refused_by_name(key, value):
    params = _model()
    where = {"scale": "group"}.get(key, "constructor")
    with pytest.raises(ValueError, match=rf"sara_ds: {key} must be finite, got {key}={value}"):
        if where == "group":
            sara_ds.SaraAdamW(_groups(params, **{key: value}))
        else:
            sara_ds.SaraAdamW(_groups(params), **{key: value})
    with pytest.raises(ValueError, match=rf"betas\[1\] must be finite, got betas\[1\]={value}.*param group 0"):
        sara_ds.SaraAdamW(_groups(params, betas=(0.9, value)))


def test_eps_zero_and_a_non_boolean_correct_bias_are_refused():
    params = _model()
    with pytest.raises(ValueError, match=r"eps must be in \(0.0, inf\), got eps=0"):
        sara_ds.SaraAdamW(_groups(params), eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be in \(0.0, inf\), got eps=0"):
        sara_ds.SaraAdafactor(_groups(params), eps=0)
    with pytest.raises(ValueError, match="correct_bias must be True or False, got correct_bias='no'"):
        sara_ds.SaraAdamW(_groups(params), correct_bias="no")
    with pytest.raises(ValueError, match=r"foreach must be one of \(None, True, False\), got foreach=1"):
        sara_ds.SaraAdamW(_groups(params), foreach=1)  # 1 == True, but a switch given as a number is a mistake
    with pytest.raises(ValueError, match=r"fused must be one of \(True, False\), got fused=0"):
        sara_ds.SaraAdamW(_groups(params), fused=0)


def test_subspace_options_are_checked_in_full_rank_groups_too():
    params = _model()
    with pytest.raises(ValueError, match=r"tp_side must be one of .*, got tp_side='x' \(param group 0\)"):
        sara_ds.SaraAdamW([dict(params=params[2:], tp_side="x")])


@pytest.mark.parametrize("typo,meant", [("update_proj_gab", "update_proj_gap"), ("rnak", "rank"), ("sacle", "scale")])
def test_a_misspelt_group_key_names_the_key_it_looks_like(typo, meant):
    params = _model()
    with pytest.raises(ValueError, match=rf"unknown key '{typo}' \(param group 0\); did you mean '{meant}'"):
        sara_ds.SaraAdamW([dict(params=params[:2], rank=4, **{typo: 10}), dict(params=params[2:])])


def test_keys_an_engine_puts_into_groups_are_left_alone():
    params = _model()  # megatron-core's scheduler keys, a scheduler's own, a user's label
    opt = sara_ds.SaraAdamW([dict(params=params[:2], rank=4, wd_mult=1.0, lr_mult=1.0, max_lr=1e-3, min_lr=0.0,
                                  is_expert_parallel=False, name="matrices"), dict(params=params[2:], initial_lr=1e-3)])
    assert opt.param_groups[0]["wd_mult"] == 1.0


def test_a_group_preset_gives_that_group_its_rule_and_contradictions_are_refused():
    params = _model()
    opt = sara_ds.SaraAdamW([dict(params=params[:1], rank=4, preset="galore"), dict(params=params[1:2], rank=4),
                             dict(params=params[2:])], preset="sara")
    assert opt.param_groups[0]["subspace"] == "dominant" and opt.param_groups[0]["preset"] == "galore"
    assert opt.param_groups[1]["subspace"] == "importance" and opt.param_groups[1]["preset"] == "sara"
    with pytest.raises(ValueError, match=r"preset='sara' means subspace='importance', but subspace='dominant' was "
                                         r"also given \(param group 0\)"):
        sara_ds.SaraAdamW([dict(params=params[:2], rank=4, subspace="dominant"), dict(params=params[2:])],
                          preset="sara")
    with pytest.raises(ValueError, match=r"preset='galore' means residual=None, but residual='fira'"):
        sara_ds.SaraAdamW([dict(params=params[:2], rank=4, preset="galore", residual="fira")])
    with pytest.raises(ValueError, match=r"unknown preset='gallore' \(param group 0\)"):
        sara_ds.SaraAdamW([dict(params=params[:2], rank=4, preset="gallore")])
    free = sara_ds.SaraAdamW([dict(params=params[:2], rank=4, subspace="dominant")])  # no preset to contradict
    assert free.param_groups[0]["subspace"] == "dominant"


def test_a_parameter_listed_twice_is_refused_by_name():
    params = _model()
    with pytest.raises(ValueError, match="param group 0 lists mlp.up twice"):
        sara_ds.SaraAdamW([dict(params=[params[0], params[0]], param_names=["mlp.up", "mlp.up"], rank=4)])
    with pytest.raises(ValueError, match="lists parameter 1 of the group twice"):
        sara_ds.SaraAdamW([params[2], params[2]])


def test_an_invalid_include_pattern_is_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"include must hold regular expressions, got include='mlp\('"):
        sara_ds.param_groups(model, rank=2, include=["mlp("])


def _saved(**options):
    params = _model()
    opt = sara_ds.SaraAdamW(_groups(params), lr=1e-2, **options)
    _train(opt, params, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("change,expected", [
    (dict(groups=dict(rank=3)), r"param group 0: rank saved 4, now 3"),
    (dict(options=dict(betas=(0.8, 0.9))), r"param group 0: betas saved \(0.9, 0.999\), now \(0.8, 0.9\)\n  param group 1"),
    (dict(options=dict(seed=5)), r"param group 0: seed saved 0, now 5"),
    (dict(options=dict(spectrum="gram")), r"param group 0: spectrum saved 'svd', now 'gram'"),
    (dict(options=dict(eps=1e-5)), r"param group 0: eps saved 1e-06, now 1e-05"),
    (dict(groups=dict(update_proj_gap=50)), r"param group 0: update_proj_gap saved 2, now 50"),
    (dict(options=dict(preset="galore")), r"param group 0: subspace saved 'importance', now 'dominant'"),
    (dict(options=dict(preset="sara_fira")), r"param group 0: residual saved None, now 'fira'"),
    (dict(options=dict(lr=3e-2)), r"param group 0: lr saved 0.01, now 0.03"),
])
def test_a_state_loaded_into_an_optimizer_built_otherwise_lists_every_difference(change, expected):
    state = _saved(preset="sara")
    params = _model()
    options = dict(dict(lr=1e-2, preset="sara"), **change.get("options", {}))
    opt = sara_ds.SaraAdamW(_groups(params, **change.get("groups", {})), **options)
    with pytest.raises(ValueError, match=expected):
        opt.load_state_dict(state)


def test_how_a_step_runs_is_the_optimizers_own_and_progress_is_the_checkpoints():
    """foreach, fused, the finite flag and the in-place threshold change how a step runs, not what the state means:
    the optimizer built to resume keeps its own; the scheduled lr and the skip count come from the checkpoint."""
    state = _saved(preset="sara", foreach=False, finite_flag="host")
    state["param_groups"][0]["lr"] = 5e-3  # where a schedule had taken it
    opt = sara_ds.SaraAdamW(_groups(_model()), lr=1e-2, preset="sara", foreach=True, finite_flag="device", fused=True)
    opt.load_state_dict(state)
    group = opt.param_groups[0]
    assert (group["foreach"], group["finite_flag"], group["fused"], group["lr"]) == (True, "device", True, 5e-3)


def test_a_new_gap_or_lr_is_accepted_on_request_and_takes_effect():
    state = _saved(preset="sara")
    params = _model()
    opt = sara_ds.SaraAdamW(_groups(params, update_proj_gap=5), lr=2e-2, preset="sara")
    with pytest.raises(ValueError, match="update_proj_gap saved 2, now 5"):
        opt.load_state_dict(state)
    with pytest.raises(ValueError, match=r"can change only \['lr', 'update_proj_gap', 'scale', 'weight_decay'\], not "
                                         r"\['rank'\]"):
        opt.load_state_dict(state, accept=["rank"])
    opt.load_state_dict(state, accept=["update_proj_gap", "lr"])
    assert opt.param_groups[0]["update_proj_gap"] == 5 and opt.param_groups[0]["lr"] == 2e-2
    refreshes = opt.refresh_counts()["refreshes"]
    _train(opt, params, 3, start=3)  # the saved step count is 3: the next refresh is at step 5, not 4
    assert opt.state[0]["step"] == 6 and opt.refresh_counts()["refreshes"] == refreshes + 2
    built = sara_ds.SaraAdamW(_groups(_model(), update_proj_gap=5), lr=1e-2, preset="sara",
                              accept_changes=["update_proj_gap"])
    built.load_state_dict(state)  # the constructor option serves engines, which call load_state_dict(state) alone


def test_a_state_in_another_parameter_order_or_of_another_base_is_refused_by_name():
    state = _saved(preset="sara")
    params = _model()
    swapped = sara_ds.SaraAdamW([dict(params=[params[1], params[0]], rank=4, update_proj_gap=2),
                                 dict(params=params[2:])], lr=1e-2, preset="sara")
    with pytest.raises(ValueError, match=r"parameter shapes \(in order\) saved \[12x20, 20x8\], now \[20x8, 12x20\]"):
        swapped.load_state_dict(state)
    for cls, base in ((sara_ds.SaraAdafactor, "adafactor"), (sara_ds.SaraAdamMini, "adam_mini")):
        other = cls(_groups(_model()), lr=1e-2, preset="sara")
        with pytest.raises(ValueError, match=f"base saved 'adamw', now '{base}'"):
            other.load_state_dict(state)
        old = dict(state, param_groups=[{k: v for k, v in g.items() if k != "sara_base"} for g in state["param_groups"]])
        same_eps = cls(_groups(_model()), lr=1e-2, preset="sara", eps=state["param_groups"][0]["eps"])
        with pytest.raises(ValueError, match=rf"param0 lacks .* which this optimizer's {base} base keeps"):
            same_eps.load_state_dict(old)  # a state from before the record: its keys name its base


def test_damaged_state_is_refused_naming_the_matrix_and_key():
    state = _saved(preset="sara")
    params = _model()
    opt = sara_ds.SaraAdamW(_groups(params), lr=1e-2, preset="sara")
    nan_basis = {**state, "state": {**state["state"], 1: dict(state["state"][1], basis=state["state"][1]["basis"] * math.nan)}}
    with pytest.raises(ValueError, match="non-finite 'basis' for param1"):
        opt.load_state_dict(nan_basis)
    missing = {**state, "state": {**state["state"], 0: {k: v for k, v in state["state"][0].items() if k != "exp_avg_sq"}}}
    with pytest.raises(ValueError, match=r"param0 lacks \['exp_avg_sq'\]"):
        opt.load_state_dict(missing)
    with pytest.raises(ValueError, match="there is no optimizer state to load \\(None\\).*zero_pp_rank"):
        opt.load_state_dict(None)


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(_saved(preset="sara"), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match=f"cannot read {path}.*damaged or was cut short"):
        checkpoints.load_file(str(path), weights_only=True)


def test_galore_torch_state_is_refused_then_converted_and_continues_as_galore_torch():
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    peer_params, ours_params = _model(), _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = galore_torch.GaLoreAdamW(_groups(peer_params, scale=0.25, proj_type="std"), lr=1e-2,
                                        no_deprecation_warning=True)
    _train(peer, peer_params, 3)  # refreshes at 0 and 2
    saved = peer.state_dict()
    ours = sara_ds.SaraAdamW(_groups(ours_params, scale=0.25), lr=1e-2, preset="galore", basis_signs="lapack")
    with pytest.raises(ValueError, match=r"galore-torch state .* sara_ds.checkpoints.from_galore_torch"):
        ours.load_state_dict(saved)
    with torch.no_grad():
        for a, b in zip(ours_params, peer_params):
            a.copy_(b)
    ours.load_state_dict(checkpoints.from_galore_torch(saved))
    assert ours.state[0]["left"] and not ours.state[1]["left"]  # 12x20 on the left, 20x8 on the right
    assert ours.refresh_counts()["refreshes"] == 4  # two per matrix
    _train(peer, peer_params, 4, start=3)  # a refresh at 4 and 6, on both
    _train(ours, ours_params, 4, start=3)
    worst = max((a - b).abs().max().item() for a, b in zip(ours_params, peer_params))
    print(f"\ngalore-torch state converted, 4 more steps: max |ours - galore-torch| = {worst:.1e}")
    assert worst < 1e-6


@pytest.mark.parametrize("spectrum", ["svd", "gram", "sketch"])
@pytest.mark.parametrize("preset", ["sara", "galore", "sara_fira"])
def test_huge_but_finite_gradients_refresh_with_every_spectrum(spectrum, preset):
    """A gram or sketch of a matrix with entries of 1e19 squares them past fp32's range, and sampling from
    singular values of 3e38 overflows: the refresh scales such gradients by a power of two first. Up to 1e30 the
    weights stay finite; entries near fp32's largest (3e38) overflow the projection R = B^T G itself, as any
    matmul of them would, but the refresh still completes."""
    for magnitude in (3e18, 1e19, 1e30, 3e38):
        params = [torch.nn.Parameter(torch.randn(24, 40))]
        opt = sara_ds.SaraAdamW([dict(params=params, rank=4, update_proj_gap=1)], preset=preset, spectrum=spectrum)
        for step in range(3):
            g = torch.randn(24, 40, generator=torch.Generator().manual_seed(step))
            params[0].grad = g / g.abs().max() * magnitude  # the largest entry is the magnitude: finite
            opt.step()
        st = opt.state[0]
        assert torch.isfinite(st["basis"]).all(), magnitude
        assert torch.allclose(st["basis"].T @ st["basis"], torch.eye(4), atol=1e-4), magnitude
        assert opt.refresh_counts() == {"refreshes": 3, "skipped_steps": 0}
        assert magnitude > 1e30 or torch.isfinite(params[0]).all(), magnitude


def test_a_plain_state_saved_before_the_record_still_loads(tmp_path):
    """A state_dict of sara_ds 0.1 (torch's layout, no per-group record) loads, and a ZeRO-era one nests its
    matrices under the flat partition's key: both load."""
    state = _saved(preset="sara")
    old = dict(state, param_groups=[{k: v for k, v in g.items() if k not in ("sara_shapes", "sara_base", "preset")}
                                    for g in state["param_groups"]])
    sara_ds.SaraAdamW(_groups(_model()), lr=1e-2, preset="sara").load_state_dict(old)
    nested = dict(old, state={0: dict(state["state"])}, param_groups=[dict(g, params=[i]) for i, g in
                                                                      enumerate(old["param_groups"])])
    opt = sara_ds.SaraAdamW(_groups(_model()), lr=1e-2, preset="sara")
    opt.load_state_dict(nested)
    assert sorted(opt.state) == [0, 1, 2] and "basis" in opt.state[1]


def test_a_state_written_by_sara_ds_0_1_loads_and_resumes_as_it_would_have():
    """tests/data/sara_ds_0.1_state.pt: a SaraAdamW (sara_fira) state_dict written by sara_ds 0.1.0 after 3 steps,
    with the weights then and after 3 more steps of 0.1.0. It loads with weights_only=True and resumes to the
    same weights up to round-off: 0.1.0 added each step with a fused multiply-add, where sara_ds now rounds the
    scaled step first (the same run with fresh moments instead of the loaded ones ends 0.09 away)."""
    saved = torch.load(os.path.join(ROOT, "tests", "data", "sara_ds_0.1_state.pt"), weights_only=True)
    params = _model()
    with torch.no_grad():
        for p, w in zip(params, saved["weights_at_3"]):
            p.copy_(w)
    opt = sara_ds.SaraAdamW(_groups(params), lr=1e-2, preset="sara_fira")
    opt.load_state_dict(saved["state"])
    _train(opt, params, 3, start=3)
    diff = max((p.detach() - w).abs().max().item() for p, w in zip(params, saved["weights_at_6"]))
    print(f"\nsara_ds 0.1 state resumed 3 steps: max |weights - 0.1.0's| = {diff:.1e}")
    assert diff < 1e-6
