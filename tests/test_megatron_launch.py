"""The Megatron-LM launcher: --sara-* flags are split off and validated; incompatible Megatron flags are refused.

Running it on Megatron-LM's own pretrain_gpt.py needs a Megatron-LM checkout (not on the package index): set
MEGATRON_LM to its path. Without one, the patch is installed on the ``megatron.training`` that megatron-core's
wheel ships from 0.17 on (Python >= 3.12); 0.16.1's wheel has none, so on Python 3.11 that test skips too.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from sara_ds.integrations.megatron_launch import split_argv

BASE = ["--num-layers", "2", "--optimizer", "adam", "--bf16"]


def test_sara_flags_are_split_off_and_parsed():
    opts, rest = split_argv(BASE + ["--sara-rank", "64", "--sara-preset", "sara_fira", "--sara-tp-spectrum", "sketch"])
    assert rest == BASE and (opts.sara_rank, opts.sara_preset, opts.sara_tp_spectrum) == (64, "sara_fira", "sketch")
    assert (opts.sara_update_proj_gap, opts.sara_scale, opts.sara_optimizer) == (200, 0.25, "SaraAdamW")


@pytest.mark.parametrize("argv,message", [
    (BASE + ["--sara-preset", "sara"], "--sara-rank"),
    (BASE + ["--sara-rank", "8", "--sara-rnak", "3"], "--sara-rnak"),
    (BASE + ["--sara-rank", "8", "--use-distributed-optimizer", "--save", "c", "--ckpt-format", "torch"],
     "--ckpt-format torch_dist"),
    (BASE + ["--sara-rank", "8", "--fp16"], "--fp16"),
    (["--optimizer", "muon", "--sara-rank", "8"], "--optimizer muon"),
    (BASE + ["--sara-rank", "8", "--save", "ckpt", "--ckpt-format", "fsdp_dtensor"], "--ckpt-format fsdp_dtensor"),
    (BASE, "no --sara-* flags"),
], ids=["rank-required", "unknown-flag", "dist-opt-torch-format", "fp16", "muon", "ckpt-fsdp-dtensor", "none"])
def test_bad_flags_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        split_argv(argv)
    assert message in (str(err.value) + capsys.readouterr().err)


def test_the_distributed_optimizer_flag_is_taken_out_of_megatron_lms_view():
    opts, rest = split_argv(BASE + ["--sara-rank", "8", "--use-distributed-optimizer", "--save", "c"])
    assert opts.distributed_optimizer and rest == BASE + ["--save", "c"]
    opts, rest = split_argv(BASE + ["--sara-rank", "8"])
    assert not opts.distributed_optimizer


@pytest.mark.parametrize("fmt", [[], ["--ckpt-format", "torch_dist"], ["--ckpt-format", "torch"]],
                         ids=["default", "torch_dist", "torch"])
def test_checkpoints_in_torch_and_torch_dist_format_are_accepted(fmt):
    _, rest = split_argv(BASE + ["--sara-rank", "8", "--save", "c", "--load", "c"] + fmt)
    assert rest == BASE + ["--save", "c", "--load", "c"] + fmt


def _megatron_training_source():
    if os.environ.get("MEGATRON_LM"):
        return os.environ["MEGATRON_LM"]
    try:
        return "" if importlib.util.find_spec("megatron.training") else None  # megatron-core's own copy
    except ModuleNotFoundError:
        return None


@pytest.mark.skipif(_megatron_training_source() == "" and sys.version_info < (3, 12),
                    reason="outside CI: megatron-core's own megatron.training (0.17 and later) imports typing.override, "
                           "which needs Python 3.12; CI's megatron-core 0.19.2 leg runs on 3.11")
@pytest.mark.skipif(_megatron_training_source() is None,
                    reason="outside CI: no megatron.training (megatron-core 0.16.1, the newest on Python 3.11, ships "
                           "none): set MEGATRON_LM to a Megatron-LM checkout, or use megatron-core>=0.17")
def test_patch_installs_on_megatron_lm_training():
    source = _megatron_training_source()
    code = ("import sys; sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None; "
            "from sara_ds.integrations import megatron_launch as m; "
            "o, _ = m.split_argv(['--sara-rank', '8']); m.install(o); import megatron.training.training as t; "
            "print(t.__file__); print(t.get_megatron_optimizer.sara_options.sara_rank)")
    run = subprocess.run([sys.executable, "-c", code, source], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("8"), run.stderr[-3000:]
    print("\npatched", run.stdout.splitlines()[-2])


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"),
                    reason="outside CI: set MEGATRON_LM to a Megatron-LM checkout (not on the package index)")
@pytest.mark.parametrize("fmt,ranks", [("torch_dist", 2), ("torch", 2), ("torch_dist+distopt", 4)],
                         ids=["torch_dist", "torch", "distributed-optimizer"])
def test_pretrain_gpt_trains_with_sara_at_tp2_and_resumes(tmp_path, fmt, ranks):
    """Megatron-LM's own pretrain_gpt.py, TP=2, mock data, through the launcher (CPU shims from this test only).
    With the distributed optimizer: TP=2 x DP=2 (4 ranks), each DP rank owning whole matrices.

    A job of 8 iterations exits after 6 (saving every 3), then a second job loads iteration 6 and finishes.
    Needs in the venv: six, triton, pybind11, and megatron/core/datasets/helpers_cpp built for this Python.
    """
    from launch_utils import ROOT, base_env, free_port

    checkout = os.environ["MEGATRON_LM"]
    args = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
            f"--micro-batch-size 2 --global-batch-size {ranks} --lr 1e-2 --mock-data --tokenizer-type "
            "NullTokenizer --vocab-size 128 --tensor-model-parallel-size 2 --transformer-impl local "
            "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion "
            "--no-rope-fusion --use-cpu-initialization --distributed-backend gloo --clip-grad 0 --eval-iters 0 "
            "--eval-interval 1000 --optimizer adam --swiglu --position-embedding-type rope --normalization RMSNorm "
            "--disable-bias-linear --no-persist-layer-norm --log-interval 1 --save ckpt --save-interval 3 "
            f"--ckpt-format {fmt.split('+')[0]} --sara-rank 4 --sara-update-proj-gap 2").split()
    if fmt.endswith("+distopt"):
        args.append("--use-distributed-optimizer")
    env = base_env(TORCHDYNAMO_DISABLE=1, CUDA_DEVICE_MAX_CONNECTIONS=1,
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env["PYTHONPATH"] = os.path.join(ROOT, "tests") + os.pathsep + env["PYTHONPATH"]

    def pretrain(*extra):
        run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(ranks),
                              "--master_port", str(free_port()), os.path.join(ROOT, "tests", "megatron_lm_shims.py"),
                              checkout, os.path.join(checkout, "pretrain_gpt.py"), *args, *extra],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert "[sara_ds] Megatron-LM optimizer: SaraAdamW" in out
        assert ("distributed over data-parallel ranks" in out) == fmt.endswith("+distopt")
        return out, [(int(i), float(x)) for i, x in re.findall(r"iteration\s+(\d+)/.*?lm loss: ([0-9.E+-]+)", out)]

    _, first = pretrain("--train-iters", "8", "--exit-interval", "6")
    print(f"\npretrain_gpt.py TP=2 with SARA ({fmt}), lm loss per iteration:", first)
    assert [i for i, _ in first] == [1, 2, 3, 4, 5, 6] and first[-1][1] < first[0][1]
    assert (tmp_path / "ckpt" / "iter_0000006").is_dir()
    if fmt.startswith("torch_dist"):
        assert (tmp_path / "ckpt" / "iter_0000006" / "metadata.json").is_file()
    # same schedule, so the scheduler state agrees; --no-load-rng because the CPU shims fake the CUDA RNG state
    out, second = pretrain("--train-iters", "8", "--load", "ckpt", "--no-load-rng")
    print(f"resumed from iteration 6 ({fmt}):", second)
    assert "loaded checkpoint from ckpt" in out and "at iteration 6" in out
    assert [i for i, _ in second] == [7, 8] and all(x < first[0][1] for _, x in second)
