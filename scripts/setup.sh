#!/usr/bin/env bash
# One-time (idempotent) set-up: a .venv with the CPU build of torch, then sara_ds with every extra.
# torch goes first: letting deepspeed resolve torch would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[deepspeed,megatron,mpi,dev]"
echo "sara_ds: environment ready in .venv ($(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
