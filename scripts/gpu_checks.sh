#!/usr/bin/env bash
# The GPU checks (docs/benchmarks.md, "GPU"), in priority order, each under its own time limit, one log per stage.
#
#   bash scripts/gpu_checks.sh                 # on a CUDA box, from the repository root; logs in runs/gpu/
#   LOGS=/tmp/gpu SIZES=60m,130m STAGES="tests step" bash scripts/gpu_checks.sh
#
# Stages: the CUDA tests (no host sync in an ordinary step under set_sync_debug_mode("error"), CPU
# agreement, bf16), the step benchmark at LLaMA-60M..350M whole-model shapes against galore-torch and
# torch AdamW, the refresh at LLaMA-7B shapes, a bf16 DeepSpeed training run of the example model, the FSDP2
# example over NCCL with a DCP checkpoint, the HF Trainer's FSDP2 (examples/hf_trainer_fsdp2.py), the 1B step,
# torch.compile / CUDA graphs on a bank's step, whole training steps (peak memory and tokens/s, plain PyTorch
# and DeepSpeed ZeRO-2, benchmarks/train_step.py) and one timed gpu60m run on the code corpus (CORPUS=the
# archive of `python -m sara_bench.code_corpus pack`, unpacked into $SARA_DS_CACHE). A stage that fails or runs
# out of time is reported and the next one runs.
set -u
LOGS=${LOGS:-runs/gpu}
SIZES=${SIZES:-60m,130m,350m}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}  # multiplies every stage's time limit
mkdir -p "$LOGS"
export PYTHONPATH=$PWD:$PWD/harness${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

STAGES=${STAGES:-env tests step refresh train fsdp2 hftrainer compiled step1b trainstep gpu60m}  # the ones to run

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$(($2 * SCALE)) start=$SECONDS rc
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return ;; esac
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-25}" "$LOGS/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start))s$([ $rc = 124 ] && echo ' (time limit)')"
}

stage env 15 bash -c "nvidia-smi -L; $PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'"
stage tests 90 $PY -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda.py tests/test_finite_flag.py tests/test_banks.py
stage step 150 $PY benchmarks/optimizer_step.py --device "$DEVICE" --sizes "$SIZES" --repeats 10 \
  --only "SaraAdamW sara,SaraAdamW sara fused,galore-torch GaLoreAdamW,torch AdamW fused,torch AdamW foreach"
stage refresh 75 $PY benchmarks/refresh.py --device "$DEVICE" ${REFRESH_ARGS:-}
stage train 75 $PY -m deepspeed.launcher.runner --num_gpus 1 examples/train.py --deepspeed_config configs/ds/sara.json \
  --dtype bf16 --no_progress --eval_interval 100
stage fsdp2 60 $PY -m torch.distributed.run --nproc_per_node "${GPUS:-1}" examples/train.py --engine fsdp2 --steps 100 \
  --eval_interval 50 --no_progress --save_dir "$LOGS/fsdp2_ckpt"
# HF Trainer with accelerate's FSDP2 (fsdp_version 2): the optimizer built before sharding must end on the FSDP2 layout
stage hftrainer 60 bash -c "$PY -m torch.distributed.run --nproc_per_node ${GPUS:-1} examples/hf_trainer_fsdp2.py \
  --steps 50 | tee /dev/stderr | grep -q 'layout FSDP2Layout'"
stage compiled 60 $PY benchmarks/compiled_bank_step.py --device "$DEVICE" --sizes "$SIZES"
stage step1b 150 $PY benchmarks/optimizer_step.py --device "$DEVICE" --sizes ${SIZES_1B:-1b} --repeats 10 \
  --only "SaraAdamW sara,galore-torch GaLoreAdamW,torch AdamW fused"
stage trainstep ${TRAINSTEP_LIMIT:-300} $PY benchmarks/train_step.py --device "$DEVICE" --sizes ${TRAINSTEP_SIZES:-350m,1b} \
  --steps 5 --warmup 2 --row_timeout 120
# one gpu60m run of the evidence campaign, timed: what the whole campaign (docs/evidence.md) would take here
stage gpu60m ${GPU60M_LIMIT:-900} bash -c "{ [ -z \"${CORPUS:-}\" ] || $PY -m sara_bench.code_corpus unpack --file \"$CORPUS\"; } && \
  $PY -m sara_bench --size gpu60m --device $DEVICE --jobs 1 --methods SARA-GaLore --seeds 0 --lrs 1e-2 \
  --out ${GPU60M_OUT:-$LOGS/gpu60m}"
