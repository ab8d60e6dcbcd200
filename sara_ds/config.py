"""Hyperparameters: defaults, the papers' presets, and validation that names what is wrong."""
from __future__ import annotations

import difflib
import math
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


def resolve_preset(preset, subspace, residual, moments_on_refresh, where: str = "") -> dict:
    """Merge explicit rule switches with a preset; a contradiction is an error, never a silent choice."""
    explicit = dict(subspace=subspace, residual=residual, moments_on_refresh=moments_on_refresh)
    explicit = {k: v for k, v in explicit.items() if v is not UNSET}
    if preset is None:
        chosen = dict(PRESETS["sara"])
    else:
        if preset not in PRESETS:
            raise ValueError(f"sara_ds: unknown preset={preset!r}{where}; choose one of {sorted(PRESETS)}")
        chosen = dict(PRESETS[preset])
        for key, value in explicit.items():
            given = _norm_residual(value) if key == "residual" else value
            if given != chosen[key]:
                raise ValueError(
                    f"sara_ds: preset={preset!r} means {key}={chosen[key]!r}, but {key}={value!r} was also "
                    f"given{where}; drop one of them (a param group's own preset=... gives that group other switches)"
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
    temporary; smaller ones build the update, one batched product per bank; 0: every one in place), and
    ``accept_changes`` (hyperparameters a loaded state may have been saved with otherwise: ``checkpoints``).
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
    accept_changes: tuple = ()

    @classmethod
    def from_kwargs(cls, owner: str, options: dict) -> "SubspaceOptions":
        unknown = sorted(set(options) - set(SUBSPACE_OPTIONS))
        if unknown:
            raise TypeError(f"sara_ds: {owner} got unknown option(s) {unknown}; "
                            f"its subspace options are {sorted(SUBSPACE_OPTIONS)}")
        return cls(**options)

    def group_defaults(self) -> dict:
        """The param-group keys: the preset, the resolved rule switches and the hyperparameters."""
        switches = ("subspace", "residual", "moments_on_refresh", "accept_changes")
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
    if not math.isfinite(value):
        raise ValueError(f"sara_ds: {key} must be finite, got {key}={value!r}{where}")
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        raise ValueError(f"sara_ds: {key} must be in {lo or '(-inf, '}{hi or 'inf)'}, got {key}={value!r}{where}")


def _integer(key, value, where, low=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = "a positive" if low == 1 else "a non-negative"
        raise ValueError(f"sara_ds: {key} must be {kind} integer, got {key}={value!r}{where}")


def _choice(key, value, choices, where):
    # by type as well as value: 1 == True, but foreach=1 is a mistake to name, not a switch to guess
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"sara_ds: {key} must be one of {choices}, got {key}={value!r}{where}")


# what sara_ds itself puts into a param group, besides its hyperparameters
BOOKKEEPING = ("params", "param_names", "rank", "sara_group", "lr_at_start", "skipped_steps", "preset")


def check_keys(group: dict, known, where: str) -> None:
    """A key that looks like a misspelt one of sara_ds's is an error that names both; other keys sara_ds does not
    know are left to whoever put them there (Megatron's wd_mult and max_lr, a scheduler's initial_lr)."""
    for key in group:
        if key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if close:
            raise ValueError(f"sara_ds: unknown key {key!r}{where}; did you mean {close[0]!r}? "
                             f"(the keys sara_ds reads are {sorted(known)})")


def resolve_group_switches(group: dict, given, where: str) -> None:
    """A param group's own ``preset`` (or rule switches) against the constructor's: the same contradiction rules.
    ``given``: the keys the caller put into this group (the rest came from the constructor)."""
    switches = ("subspace", "residual", "moments_on_refresh")
    if "preset" not in given and not any(k in given for k in switches):
        return
    explicit = {k: group[k] if k in given else UNSET for k in switches}
    if group.get("preset") is None:  # no preset to contradict: the group's switches over the constructor's
        explicit = {k: (group[k] if v is UNSET else v) for k, v in explicit.items()}
    group.update(resolve_preset(group.get("preset"), where=where, **explicit))


def validate_group(group: dict, base: str, group_index=None, given=(), known=()) -> None:
    """Check every hyperparameter this package reads; raise ValueError naming the key, the value and the group."""
    w = _where(group_index)
    if known:
        check_keys(group, set(known) | set(BOOKKEEPING), w)
    resolve_group_switches(group, given, w)
    _check_base(group, base, w)
    _check_options(group, base, w)
    _check_projection(group, w)  # every group: a full-rank group's subspace options would apply if it gained a rank


def _check_base(group: dict, base: str, w: str) -> None:
    _number("lr", group["lr"], w, low=0.0)
    _number("weight_decay", group["weight_decay"], w, low=0.0)
    _number("eps", group["eps"], w, low=0.0, low_open=True)  # 0 divides by zero where a gradient entry is 0
    if base in ("adamw", "adam_mini"):
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"sara_ds: betas must be a pair (beta1, beta2), got betas={betas!r}{w}")
        for i, b in enumerate(betas):
            _number(f"betas[{i}]", b, w, low=0.0, high=1.0)
    if not isinstance(group.get("correct_bias", True), bool):
        raise ValueError(f"sara_ds: correct_bias must be True or False, got correct_bias={group['correct_bias']!r}{w}")
    if base == "adafactor":
        if group["beta1"] is not None:
            _number("beta1", group["beta1"], w, low=0.0, high=1.0)
        _number("decay_rate", group["decay_rate"], w, low=-1.0, high=0.0, high_open=True)
        _number("clip_threshold", group["clip_threshold"], w, low=0.0, low_open=True)


def _check_options(group: dict, base: str, w: str) -> None:
    _choice("foreach", group.get("foreach"), (None, True, False), w)
    _choice("finite_flag", group.get("finite_flag"), FINITE_FLAGS, w)
    _integer("in_place_min_numel", group.get("in_place_min_numel", 0), w, low=0)
    _choice("fused", group.get("fused"), (True, False), w)
    if group.get("fused") and (base != "adamw" or not group.get("correct_bias", True)):
        why = f"the {base} base" if base != "adamw" else "correct_bias=False"
        raise ValueError(f"sara_ds: fused=True runs torch's fused AdamW kernel, which has no form for {why}{w}")
    _integer("seed", group["seed"], w, low=0)


def _check_projection(group: dict, w: str) -> None:
    if "rank" in group:
        _integer("rank", group["rank"], w)
    _integer("update_proj_gap", group["update_proj_gap"], w)
    _number("scale", group["scale"], w, low=0.0, low_open=True)
    _choice("proj_type", group["proj_type"], PROJ_TYPES, w)
    _choice("subspace", group["subspace"], RULES, w)
    group["residual"] = _norm_residual(group["residual"])
    _choice("residual", group["residual"], RESIDUALS, w)
    _choice("moments_on_refresh", group["moments_on_refresh"], MOMENT_POLICIES, w)
    _number("grass_walk_angle", group["grass_walk_angle"], w, low=0.0, low_open=True, high=3.1416)
    _choice("basis_signs", group["basis_signs"], SIGN_CONVENTIONS, w)
    _choice("spectrum", group["spectrum"], LOCAL_SPECTRA, w)
    _choice("tp_side", group["tp_side"], TP_SIDES, w)
    _choice("tp_spectrum", group["tp_spectrum"], TP_SPECTRA, w)
    _integer("sketch_oversample", group["sketch_oversample"], w)
    _integer("sketch_power_iters", group["sketch_power_iters"], w, low=0)
    if group["osd_lr"] is not None:
        _number("osd_lr", group["osd_lr"], w, low=0.0)
    _number("osd_orth_penalty", group["osd_orth_penalty"], w, low=0.0)
