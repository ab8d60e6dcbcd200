"""What every multi-process test worker shares: start-up, the scenario loop and shut-down.

A test writes a spec (``launch_utils.run_scenarios``: the scenarios, where rank 0 puts the results, a scratch
folder) and starts N ranks of a worker; the worker's ``main`` is one call of ``serve`` with its own
``run_scenario(sc, spec)``. ``serve`` starts torch.distributed over gloo as the engine under test does (DeepSpeed's
``init_distributed``, or plain torch; megatron-core's model-parallel state on top), runs each scenario, turns the
error of one that expects it (``expect_error``) into a result, gathers what the test compares across ranks, saves
rank 0's list, and shuts everything down.
"""
import datetime
import gc
import json
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLLECTIVE_TIMEOUT_S = 300


def serve(spec_path: str, run_scenario, *, engine: str = "torch", tp: int | None = None, gather=(),
          gather_into: str = "per_rank", before=None) -> None:
    """``engine``: 'torch' (``init_process_group('gloo')``) or 'deepspeed' (``deepspeed.init_distributed``, with
    ``prepare_cpu_launch``). ``tp``: megatron-core's tensor-parallel size ('world': every rank; None: no
    model-parallel state).
    ``gather``: the keys of each result collected from every rank into ``result[gather_into]`` on rank 0.
    ``before``: called first, before torch.distributed starts (a CPU shim, a wire counter)."""
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    spec = json.load(open(spec_path))
    # Every group's collectives time out (gloo's default is 30 min): the groups a device mesh or megatron-core
    # makes later take the module default, not the default group's.
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = timeout
    if before is not None:
        before()
    if engine == "deepspeed":
        import deepspeed

        from sara_ds.integrations import deepspeed as sara_deepspeed

        sara_deepspeed.prepare_cpu_launch()
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    if tp is not None:
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dist.get_world_size() if tp == "world" else tp)
    results = []
    for sc in spec["scenarios"]:
        try:
            results.append(run_scenario(sc, spec))
        except Exception as exc:  # a scenario that expects an error reports it instead of dying
            if not sc.get("expect_error"):
                traceback.print_exc()
                raise
            results.append({"name": sc.get("name"), "error": f"{type(exc).__name__}: {exc}"})
        gc.collect()
    if gather:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, [{k: r.get(k) for k in gather} for r in results])
        for i, r in enumerate(results):
            r[gather_into] = [mine[i] for mine in everyone]
    if dist.get_rank() == 0:
        torch.save(results, spec["out"])
    dist.barrier()
    if tp is not None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
