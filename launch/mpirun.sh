#!/bin/bash
# sara_ds under mpirun (Open MPI, MPICH or Intel MPI, on a workstation or inside a SLURM allocation).
# sara_ds.env reads the launcher's own rank variables (OMPI_COMM_WORLD_*, PMI_*) and falls back to mpi4py;
# rank 0's host and a free port on it are broadcast over MPI, so MASTER_ADDR/MASTER_PORT need not be set.
#
#   NP=4 launch/mpirun.sh
#   NP=16 MPIRUN="mpirun --hostfile hosts" CONFIG=configs/ds/sara_zero1.json launch/mpirun.sh
#
# Knobs: NP (ranks, default 2), MPIRUN (the launcher command; Open MPI as root needs --allow-run-as-root),
# CONFIG, TRAIN_ARGS, PY.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec ${MPIRUN:-mpirun} -n "${NP:-2}" "${PY:-python}" examples/train.py \
  --deepspeed_config "${CONFIG:-configs/ds/sara.json}" --no_progress ${TRAIN_ARGS:-}
