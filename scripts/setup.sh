#!/usr/bin/env bash
# One-time (idempotent) set-up: a .venv with the CPU build of torch, then sara_ds with every extra and,
# beside it, the evidence harness sara_bench (harness/: example model, corpus, `sara-bench`).
# torch goes first: letting deepspeed resolve torch would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[deepspeed,megatron,mpi,dev,docs]" -e harness
# A real SLURM for the cluster tests (Debian's slurm-wlm; the tests start it on localhost themselves),
# and Debian's Open MPI next to PyPI's mpich, so both MPI flavours are exercised.
if ! command -v slurmctld >/dev/null 2>&1 || [ ! -x /usr/bin/mpirun ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client openmpi-bin >/dev/null
  else
    echo "sara_ds: slurm-wlm / openmpi-bin missing and cannot apt-get install them; those tests will be skipped" >&2
  fi
fi
versions=$(DS_ACCELERATOR=cpu .venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1)
echo "sara_ds: environment ready in .venv ($versions)"
