"""Hyperparameters: defaults, the papers' presets, and validation that names what is wrong."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

from .projector import PROJ_TYPES
from .spectral import LOCAL_SPECTRA, TP_SPECTRA
from .subspace import RULES, SIGN_CONVENTIONS

RESIDUALS = (None, "fira")
MOMENT_POLICIES = ("keep", "reset", "transport")
FINITE_FLAGS = (None, "host", "device")
TP_SIDES = ("same", "unsplit")
IN_PLACE_MIN_NUMEL = 1 << 22  # 2048 x 2048, LLaMA-1B's matrices and up: a bank's update would be k weights' worth

# Each preset is a point in (subspace, residual, moments_on_refresh).
PRESETS = {
    "galore": dict(subspace="dominant", residual=None, moments_on_refresh="keep"),
    "sara": dict(subspace="importance", residual=None, moments_on_refresh="keep"),
    "fira": dict(subspace="dominant", residual="fira", moments_on_refresh="keep"),
    "sara_fira": dict(subspace="importance", residual="fira", moments_on_refresh="keep"),
    "golore": dict(subspace="random", residual=None, moments_on_refresh="transport"),
    "grassjump": dict(subspace="random", residual="fira", moments_on_refresh="transport"),
    "grasswalk": dict(subspace="grass_walk", residual="fira", moments_on_refresh="transport"),
    "osd": dict(subspace="online_pca", residual=None, moments_on_refresh="keep"),
}

PRESET_PAPERS = {
    "galore": "GaLore, Zhao et al. 2024 (arXiv 2403.03507)",
    "sara": "SARA / I3S, Zhang et al. 2025 (arXiv 2502.05790)",
    "fira": "Fira, Chen et al. 2024 (arXiv 2410.01623)",
    "sara_fira": "SARA applied to Fira (arXiv 2502.05790)",
    "golore": "GoLore, He et al. 2024 (arXiv 2410.11289)",
    "grassjump": "GrassJump, Rajabi et al. 2025 (arXiv 2510.01878)",
    "grasswalk": "GrassWalk, Rajabi et al. 2025 (arXiv 2510.01878)",
    "osd": "Online Subspace Descent, Liang et al. 2024 (arXiv 2408.12857)",
}

# Keys that only mean something on a projected group (galore-torch's convention:
# a group is projected iff it carries 'rank').
PROJECTION_DEFAULTS = dict(update_proj_gap=200, scale=0.25, proj_type="std")


class _Unset:
    def __repr__(self):
        return "<unset>"


UNSET = _Unset()


def resolve_preset(preset, subspace, residual, moments_on_refresh) -> dict:
    """Merge explicit rule switches with a preset; a contradiction is an error, never a silent choice."""
    explicit = dict(subspace=subspace, residual=residual, moments_on_refresh=moments_on_refresh)
    explicit = {k: v for k, v in explicit.items() if v is not UNSET}
    if preset is None:
        chosen = dict(PRESETS["sara"])
    else:
        if preset not in PRESETS:
            raise ValueError(f"sara_ds: unknown preset={preset!r}; choose one of {sorted(PRESETS)}")
        chosen = dict(PRESETS[preset])
        for key, value in explicit.items():
            given = _norm_residual(value) if key == "residual" else value
            if given != chosen[key]:
                raise ValueError(
                    f"sara_ds: preset={preset!r} means {key}={chosen[key]!r}, but {key}={value!r} was also given; "
                    "drop one of them"
                )
    chosen.update({k: (_norm_residual(v) if k == "residual" else v) for k, v in explicit.items()})
    return chosen


@dataclass(frozen=True)
class SubspaceOptions:
    """The subspace switches every base shares, as one frozen record.

    ``preset`` picks a paper's rule, residual and moment policy (``PRESETS``); ``subspace``,
    ``residual`` and ``moments_on_refresh`` set them one by one. The rest are the rules'
    hyperparameters: ``seed`` (of the sampled and random rules), ``grass_walk_angle``,
    ``osd_lr`` / ``osd_orth_penalty`` (OSD), how a refresh forms the spectrum of a matrix held
    whole (``spectrum``: 'svd', 'gram', 'sketch') and of a TP-split one (``tp_spectrum``: 'tsqr',
    'gram', 'sketch'), which side a TP-split matrix's basis goes on (``tp_side``: 'same', the side one process
    would choose, so that tensor parallelism runs the same algorithm; where that is the split axis, R is summed
    over the TP group every step, r x (the other side) numbers; 'unsplit': the whole axis, no per-step
    communication, but a different subspace wherever the two sides differ), the sketch's ``sketch_oversample`` and ``sketch_power_iters``, and
    ``basis_signs`` ('aligned' or 'lapack'), and ``foreach`` (True: projected matrices of one shape are
    stepped as one bank, and AdamW's full-rank tensors with torch's foreach kernels; False: one by one,
    the same arithmetic; None: True where the gradients are on a GPU, as torch's optimizers decide), and
    ``fused`` (AdamW base: full-rank fp32 tensors through torch's fused AdamW kernel, the same update up to
    round-off), and ``finite_flag`` (how a step with a NaN or Inf gradient is found and skipped: 'host'
    reads the flag back, one host sync per step, and a skipped step is as if it had never been called;
    'device' keeps it on the device, no host sync in an ordinary step, and a skipped step leaves weights
    and optimizer state untouched but still counts towards the step counts, that is the refresh schedule
    and the bias correction; steps that refresh or create state decide on the host in both; None: 'device'
    where the gradients are on a GPU), and ``in_place_min_numel`` (projected 2-D fp32 weights with at least
    this many elements, 4M by default, take B N straight into the weight with one addmm_, no m x n
    temporary; smaller ones build the update, one batched product per bank; 0: every one in place).
    Values are checked per param group by ``validate_group``.
    """

    preset: object = None
    subspace: object = UNSET
    residual: object = UNSET
    moments_on_refresh: object = UNSET
    seed: int = 0
    grass_walk_angle: float = 0.5
    osd_lr: object = None
    osd_orth_penalty: float = 0.1
    spectrum: str = "svd"
    tp_spectrum: str = "tsqr"
    tp_side: str = "same"
    sketch_oversample: int = 8
    sketch_power_iters: int = 2
    basis_signs: str = "aligned"
    foreach: object = None
    fused: bool = False
    finite_flag: object = None
    in_place_min_numel: int = IN_PLACE_MIN_NUMEL

    @classmethod
    def from_kwargs(cls, owner: str, options: dict) -> "SubspaceOptions":
        unknown = sorted(set(options) - set(SUBSPACE_OPTIONS))
        if unknown:
            raise TypeError(f"sara_ds: {owner} got unknown option(s) {unknown}; "
                            f"its subspace options are {sorted(SUBSPACE_OPTIONS)}")
        return cls(**options)

    def group_defaults(self) -> dict:
        """The param-group keys: the resolved rule switches and the hyperparameters."""
        switches = ("preset", "subspace", "residual", "moments_on_refresh")
        rules = resolve_preset(self.preset, self.subspace, self.residual, self.moments_on_refresh)
        return dict({f: getattr(self, f) for f in SUBSPACE_OPTIONS if f not in switches}, **rules)


SUBSPACE_OPTIONS = tuple(f.name for f in fields(SubspaceOptions))


def _norm_residual(value):
    return None if value in (None, "none", "None", False) else value


def _where(group_index) -> str:
    return "" if group_index is None else f" (param group {group_index})"


def _number(key, value, where, *, low=None, high=None, low_open=False, high_open=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"sara_ds: {key} must be a number, got {key}={value!r}{where}")
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        raise ValueError(f"sara_ds: {key} must be in {lo or '(-inf, '}{hi or 'inf)'}, got {key}={value!r}{where}")


def _positive_int(key, value, where):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"sara_ds: {key} must be a positive integer, got {key}={value!r}{where}")


def validate_group(group: dict, base: str, group_index=None) -> None:
    """Check every hyperparameter this package reads; raise ValueError naming the key and value."""
    w = _where(group_index)
    _number("lr", group["lr"], w, low=0.0)
    _number("weight_decay", group["weight_decay"], w, low=0.0)
    _number("eps", group["eps"], w, low=0.0)
    if base in ("adamw", "adam_mini"):
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"sara_ds: betas must be a pair (beta1, beta2), got betas={betas!r}{w}")
        for i, b in enumerate(betas):
            _number(f"betas[{i}]", b, w, low=0.0, high=1.0)
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"sara_ds: foreach must be None, True or False, got foreach={group['foreach']!r}{w}")
    if group.get("finite_flag") not in FINITE_FLAGS:
        raise ValueError(f"sara_ds: finite_flag must be one of {FINITE_FLAGS}, got finite_flag={group['finite_flag']!r}{w}")
    if "in_place_min_numel" in group:
        value = group["in_place_min_numel"]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"sara_ds: in_place_min_numel must be a non-negative integer, "
                             f"got in_place_min_numel={value!r}{w}")
    if group.get("fused") not in (True, False):
        raise ValueError(f"sara_ds: fused must be True or False, got fused={group['fused']!r}{w}")
    if group.get("fused") and (base != "adamw" or not group.get("correct_bias", True)):
        why = f"the {base} base" if base != "adamw" else "correct_bias=False"
        raise ValueError(f"sara_ds: fused=True runs torch's fused AdamW kernel, which has no form for {why}{w}")
    if base == "adafactor":
        if group["beta1"] is not None:
            _number("beta1", group["beta1"], w, low=0.0, high=1.0)
        _number("decay_rate", group["decay_rate"], w, low=-1.0, high=0.0, high_open=True)
        _number("clip_threshold", group["clip_threshold"], w, low=0.0, low_open=True)
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"sara_ds: seed must be a non-negative integer, got seed={seed!r}{w}")
    if "rank" not in group:
        return
    _positive_int("rank", group["rank"], w)
    _positive_int("update_proj_gap", group["update_proj_gap"], w)
    _number("scale", group["scale"], w, low=0.0, low_open=True)
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"sara_ds: proj_type must be one of {PROJ_TYPES}, got proj_type={group['proj_type']!r}{w}")
    if group["subspace"] not in RULES:
        raise ValueError(f"sara_ds: subspace must be one of {RULES}, got subspace={group['subspace']!r}{w}")
    group["residual"] = _norm_residual(group["residual"])
    if group["residual"] not in RESIDUALS:
        raise ValueError(f"sara_ds: residual must be None or 'fira', got residual={group['residual']!r}{w}")
    if group["moments_on_refresh"] not in MOMENT_POLICIES:
        raise ValueError(
            f"sara_ds: moments_on_refresh must be one of {MOMENT_POLICIES}, "
            f"got moments_on_refresh={group['moments_on_refresh']!r}{w}"
        )
    _number("grass_walk_angle", group["grass_walk_angle"], w, low=0.0, low_open=True, high=3.1416)
    if group["basis_signs"] not in SIGN_CONVENTIONS:
        raise ValueError(f"sara_ds: basis_signs must be one of {SIGN_CONVENTIONS}, "
                         f"got basis_signs={group['basis_signs']!r}{w}")
    if group["spectrum"] not in LOCAL_SPECTRA:
        raise ValueError(f"sara_ds: spectrum must be one of {LOCAL_SPECTRA}, got spectrum={group['spectrum']!r}{w}")
    if group["tp_side"] not in TP_SIDES:
        raise ValueError(f"sara_ds: tp_side must be one of {TP_SIDES}, got tp_side={group['tp_side']!r}{w}")
    if group["tp_spectrum"] not in TP_SPECTRA:
        raise ValueError(f"sara_ds: tp_spectrum must be one of {TP_SPECTRA}, got tp_spectrum={group['tp_spectrum']!r}{w}")
    _positive_int("sketch_oversample", group["sketch_oversample"], w)
    if isinstance(group["sketch_power_iters"], bool) or not isinstance(group["sketch_power_iters"], numbers.Integral) \
            or group["sketch_power_iters"] < 0:
        raise ValueError(f"sara_ds: sketch_power_iters must be a non-negative integer, "
                         f"got sketch_power_iters={group['sketch_power_iters']!r}{w}")
    if group["osd_lr"] is not None:
        _number("osd_lr", group["osd_lr"], w, low=0.0)
    _number("osd_orth_penalty", group["osd_orth_penalty"], w, low=0.0)
