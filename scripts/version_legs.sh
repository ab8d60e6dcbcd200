#!/usr/bin/env bash
# CI's version legs: the engine suites at the other end of each tested range (sara_ds/versions.py), each in a venv
# of its own beside the main one (.venv holds the newest DeepSpeed and megatron-core 0.16.1).
#
#   bash scripts/version_legs.sh            # both legs
#   LEGS=deepspeed bash scripts/version_legs.sh
#
# megatron-core 0.17 and later declare Python >= 3.12. On this Python 3.11 machine the newest (0.19.2) is installed
# with --ignore-requires-python after numpy<2.5 (numpy 2.5 needs 3.12 too) and triton (imported at import time):
# the nearest CI can come to a Python 3.12 user's install without a 3.12 build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LEGS=${LEGS:-deepspeed megatron}
read -r DS_OLDEST DS_NEWEST MC_NEWEST < <("$PY" -c "import re; t = open('sara_ds/versions.py').read(); \
print(*re.search(r'\"deepspeed\": \(\"([^\"]+)\", \"([^\"]+)\"', t).groups(), \
re.search(r'\"megatron-core\": \(\"[^\"]+\", \"([^\"]+)\"', t).group(1))")
export SARA_DS_REQUIRE_ALL=1

venv() {  # venv NAME PIP-ARGS...: torch's CPU build first, then the rest, then sara_ds and the harness
  local dir=.venv-$1
  shift
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  for spec in "$@"; do "$dir/bin/python" -m pip install -q $spec; done
  "$dir/bin/python" -m pip install -q -e ".[dev]" -e harness
}

for leg in $LEGS; do
  start=$SECONDS
  case $leg in
    deepspeed)
      if [ "$DS_OLDEST" = "$DS_NEWEST" ]; then
        echo "=== version leg deepspeed: one tested release ($DS_NEWEST), which the main suite runs"; continue
      fi
      echo "=== version leg: DeepSpeed $DS_OLDEST (the oldest tested), the DeepSpeed suites"
      venv ds-oldest "deepspeed==$DS_OLDEST megatron-core==0.16.1"
      .venv-ds-oldest/bin/python -m pytest -q -p no:cacheprovider tests/test_deepspeed.py tests/test_deepspeed_tp.py \
        tests/test_deepspeed_universal.py ;;
    megatron)
      echo "=== version leg: megatron-core $MC_NEWEST (the newest tested) with --ignore-requires-python, the Megatron suites"
      venv mc-newest "numpy<2.5" "--ignore-requires-python megatron-core==$MC_NEWEST psutil" triton
      .venv-mc-newest/bin/python -m pytest -q -p no:cacheprovider tests/test_megatron.py tests/test_megatron_traffic.py tests/test_tensor_parallel.py \
        tests/test_megatron_launch.py ;;
    *) echo "unknown leg $leg" >&2; exit 2 ;;
  esac
  echo "=== version leg $leg: $((SECONDS - start)) s"
done
