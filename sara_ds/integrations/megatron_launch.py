"""Run Megatron-LM's own ``pretrain_gpt.py`` with SARA, selected by flags.

    torchrun --nproc_per_node 8 -m sara_ds.integrations.megatron_launch /path/to/Megatron-LM/pretrain_gpt.py \\
        <the usual Megatron-LM arguments> \\
        --sara-rank 256 --sara-preset sara --sara-update-proj-gap 200 --sara-scale 0.25

``--use-distributed-optimizer`` selects SARA's distributed optimizer (each data-parallel
rank owns whole matrices, see ``sara_ds.integrations.megatron``); the launcher takes the
flag out of Megatron-LM's view, so that Megatron-LM all-reduces gradients and checkpoints
as without it, and use ``--ckpt-format torch_dist`` (the default) with it.

The ``--sara-*`` flags are removed from ``sys.argv`` (so neither Megatron-LM argparse
era sees them), ``megatron.training.training.get_megatron_optimizer`` is replaced by a
wrapper that builds ``get_sara_megatron_optimizer`` with the same arguments, and the
script is run as ``__main__``. Keep ``--optimizer adam``: its betas and eps configure
SARA's base update. Every Megatron-LM version from core_v0.16 to main calls the
module-level name ``get_megatron_optimizer`` from ``setup_model_and_optimizer``, which is
what makes this patch portable.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import runpy
import sys

from ..config import PRESETS
from ..optim import OPTIMIZERS
from ..spectral import TP_SPECTRA


def sara_argument_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sara_ds megatron launcher", add_help=False)
    ap.add_argument("--sara-rank", type=int, required=True, help="projection rank r")
    ap.add_argument("--sara-preset", default="sara", choices=sorted(PRESETS))
    ap.add_argument("--sara-optimizer", default="SaraAdamW", choices=sorted(OPTIMIZERS))
    ap.add_argument("--sara-update-proj-gap", type=int, default=200)
    ap.add_argument("--sara-scale", type=float, default=0.25)
    ap.add_argument("--sara-tp-spectrum", default="tsqr", choices=TP_SPECTRA)
    ap.add_argument("--sara-seed", type=int, default=0)
    ap.add_argument("--sara-include", nargs="+", default=None, help="regexes of projected parameter names")
    return ap


def split_argv(argv):
    """(sara options, the remaining Megatron-LM argv). Errors name the offending flag."""
    if not any(a.startswith("--sara-") for a in argv):
        raise SystemExit("sara_ds: no --sara-* flags given; at least --sara-rank is required")
    ours, rest = sara_argument_parser().parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--sara-")]
    if stray:
        raise SystemExit(f"sara_ds: unknown flag(s) {stray}; see --sara-* in `python -m sara_ds.integrations.megatron_launch -h`")
    _refuse_incompatible(rest)
    # SARA's distributed optimizer owns whole matrices per DP rank (megatron-core's layer-wise one) and needs the
    # all-reduced gradient: Megatron-LM must build its DDP (and checkpoints) as without the flag.
    ours.distributed_optimizer = DISTRIBUTED_OPTIMIZER in rest
    rest = [a for a in rest if a != DISTRIBUTED_OPTIMIZER]
    return ours, rest


def _flag_value(argv, flag):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# torch: each rank's state_dict(); torch_dist: SARA's sharded_state_dict (sara_ds.integrations.megatron)
CKPT_FORMATS = ("torch_dist", "torch")


DISTRIBUTED_OPTIMIZER = "--use-distributed-optimizer"


def _refuse_incompatible(argv):
    if DISTRIBUTED_OPTIMIZER in argv and ("--save" in argv or "--load" in argv) and _flag_value(argv, "--ckpt-format") == "torch":
        raise SystemExit("sara_ds: --use-distributed-optimizer with --ckpt-format torch would lose state: Megatron-LM "
                         "saves the optimizer of data-parallel rank 0 only, and each rank owns other matrices. Use "
                         "--ckpt-format torch_dist (the default), which also reshards to other TP and DP sizes")
    if "--fp16" in argv:
        raise SystemExit("sara_ds: --fp16 is not supported with SARA; use --bf16")
    optimizer = _flag_value(argv, "--optimizer")
    if optimizer not in (None, "adam"):
        raise SystemExit(f"sara_ds: --optimizer {optimizer} would be replaced by SARA; use --optimizer adam "
                         "(its --adam-beta1/--adam-beta2/--adam-eps configure SARA's base update)")
    ckpt_format = _flag_value(argv, "--ckpt-format")
    if ("--save" in argv or "--load" in argv) and ckpt_format not in (None,) + CKPT_FORMATS:
        raise SystemExit(f"sara_ds: --ckpt-format {ckpt_format} cannot hold SARA's low-rank state; use one of "
                         f"{', '.join(CKPT_FORMATS)} (torch_dist is Megatron-LM's default)")


def install(options) -> None:
    """Make Megatron-LM's training loop build SARA for the attention/MLP weights."""
    import megatron.training.training as training

    from .megatron import MEGATRON_INCLUDE, get_sara_megatron_optimizer

    original = training.get_megatron_optimizer
    if getattr(original, "sara_options", None) is not None:
        return

    def get_megatron_optimizer(config, model_chunks, *args, config_overrides=None, use_gloo_process_groups=True,
                               **kwargs):
        if options.distributed_optimizer:
            config = dataclasses.replace(config, use_distributed_optimizer=True)
        chained = get_sara_megatron_optimizer(
            config, model_chunks, rank=options.sara_rank, update_proj_gap=options.sara_update_proj_gap,
            scale=options.sara_scale, optimizer=options.sara_optimizer,
            include=options.sara_include or MEGATRON_INCLUDE, config_overrides=config_overrides,
            use_gloo_process_groups=use_gloo_process_groups, preset=options.sara_preset,
            tp_spectrum=options.sara_tp_spectrum, seed=options.sara_seed)
        _announce(chained, options)
        return chained

    get_megatron_optimizer.sara_options = options
    training.get_megatron_optimizer = get_megatron_optimizer


def _announce(chained, options) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    sara = chained.chained_optimizers[0].optimizer
    rest = [type(o.optimizer).__name__ for o in chained.chained_optimizers[1:]]
    layout = (", distributed over data-parallel ranks (whole matrices per rank)" if options.distributed_optimizer
              else "")
    print(f"[sara_ds] Megatron-LM optimizer: {type(sara).__name__} (preset={options.sara_preset}, r={options.sara_rank}, "
          f"T={options.sara_update_proj_gap}, tp_spectrum={options.sara_tp_spectrum}) for "
          f"{len(sara.original_params)} matrices; Megatron's {rest} for the rest{layout}", flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sara_argument_parser().print_help()
        return
    script, rest = argv[0], argv[1:]
    if not os.path.isfile(script):
        raise SystemExit(f"sara_ds: Megatron-LM script not found: {script}")
    options, megatron_argv = split_argv(rest)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # the Megatron-LM checkout's `megatron` package
    install(options)
    sys.argv = [script, *megatron_argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
