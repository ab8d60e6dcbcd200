"""sara_ds.env.discover: every launcher's variables map to RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*."""
import pytest

from sara_ds import env as sara_env


def _discover(variables, **kw):
    environ = dict(variables)
    source = sara_env.discover(environ=environ, **kw)
    return source, {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def test_torchrun():
    src, e = _discover(dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29400",
                            TORCHELASTIC_RUN_ID="x"))
    assert src == "torchrun" and e == dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.0.0.1",
                                           MASTER_PORT="29400")


def test_deepspeed_launcher():
    src, e = _discover(dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_SIZE="2", CROSS_RANK="0",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"))
    assert src == "deepspeed" and e["RANK"] == "1"


def test_open_mpi_on_one_node_without_mpi4py_rendezvous(monkeypatch):
    monkeypatch.setattr(sara_env, "mpi_rendezvous", lambda env, source=None: None)
    src, e = _discover(dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="1",
                            OMPI_COMM_WORLD_LOCAL_SIZE="2"), default_port=29611)
    assert src == "openmpi" and e == dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT="29611")


def test_mpich_uses_rank_zero_host_from_mpi(monkeypatch):
    monkeypatch.setattr(sara_env, "mpi_rendezvous", lambda env, source=None: ("node7", 40111))
    src, e = _discover(dict(PMI_RANK="2", PMI_SIZE="4", MPI_LOCALRANKID="0"))
    assert src == "mpich" and e["LOCAL_RANK"] == "0" and (e["MASTER_ADDR"], e["MASTER_PORT"]) == ("node7", "40111")


def test_srun_task(monkeypatch):
    monkeypatch.setattr(sara_env, "first_slurm_host", lambda env: "gpu-a01")
    src, e = _discover(dict(SLURM_JOB_ID="12345", SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_NTASKS="8",
                            SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu-a[01-02]"))
    assert src == "slurm" and e == dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="gpu-a01",
                                        MASTER_PORT=str(20000 + 12345 % 20000))


def test_an_explicit_port_wins_over_the_slurm_job_id_port(monkeypatch):
    monkeypatch.setattr(sara_env, "first_slurm_host", lambda env: "gpu-a01")
    src, e = _discover(dict(SLURM_JOB_ID="12345", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="2",
                            SLURM_LOCALID="0", SLURM_JOB_NODELIST="gpu-a[01-02]"), default_port=29777)
    assert src == "slurm" and e["MASTER_PORT"] == "29777"


def test_plain_python_is_a_single_process():
    src, e = _discover({})
    assert src == "single" and (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) == ("0", "1", "0")


def test_partial_torch_variables_are_an_error():
    with pytest.raises(sara_env.LaunchError, match=r"\['RANK'\] are set but \['WORLD_SIZE', 'LOCAL_RANK'\]"):
        _discover(dict(RANK="0"))


def test_multi_task_allocation_outside_srun_is_an_error():
    with pytest.raises(sara_env.LaunchError, match="not in an srun step"):
        _discover(dict(SLURM_JOB_ID="7", SLURM_NTASKS="4"))


def test_multi_node_mpi_without_a_way_to_find_rank_zero_is_an_error(monkeypatch):
    monkeypatch.setattr(sara_env, "mpi_rendezvous", lambda env, source=None: None)
    with pytest.raises(sara_env.LaunchError, match="MASTER_ADDR is not set"):
        _discover(dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_SIZE="2"))
