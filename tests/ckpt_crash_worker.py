"""One rank of the checkpoint-crash test: rank 1 dies half-way through writing its ZeRO shard.

    ckpt_crash_worker.py save   SAVER CKPT   # step, save step1, step, save step2 (rank 1 dies inside it)
    ckpt_crash_worker.py resume SAVER CKPT OUT   # load `latest`, train to STEPS, rank 0 writes weights to OUT
    ckpt_crash_worker.py straight - - OUT   # STEPS steps, no checkpoint

SAVER is ``sara_ds`` (``sara_ds.integrations.deepspeed.save_checkpoint``) or ``deepspeed`` (the engine's own
``save_checkpoint``). The death is a test shim on the checkpoint engine's ``save``: half the bytes, then
``os._exit``, as a SIGKILL or a lost node would leave the file.
"""
import io
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ds_worker import make_engine, full_weights, train  # noqa: E402

STEPS = 4
SCENARIO = dict(params=dict(lr=0.01, rank=4, update_proj_gap=2, scale=0.25, seed=5, preset="sara"),
                zero={"stage": 2})


def die_while_writing_shard(engine, tag):
    real_save = engine.checkpoint_engine.save

    def save(state, path):
        if tag in path and "optim_states" in path:
            buf = io.BytesIO()
            torch.save(state, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: buf.tell() // 2])
            os._exit(9)
        return real_save(state, path)

    engine.checkpoint_engine.save = save


def main(phase, saver, ckpt, out=None):
    import deepspeed
    import torch.distributed as dist

    from sara_ds.integrations import deepspeed as sara_deepspeed

    warnings.filterwarnings("ignore")
    sara_deepspeed.prepare_cpu_launch()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    model, engine = make_engine(SCENARIO, world)

    def save(tag, step):
        if saver == "sara_ds":
            sara_deepspeed.save_checkpoint(engine, ckpt, tag, {"step": step})
        else:
            engine.save_checkpoint(ckpt, tag=tag, client_state={"step": step})

    if phase == "save":
        train(engine, 0, 1, rank, world)
        save("step1", 1)
        train(engine, 1, 2, rank, world)
        if rank == 1:
            die_while_writing_shard(engine, "step2")
        save("step2", 2)
        return
    start = 0
    if phase == "resume":
        _, client = engine.load_checkpoint(ckpt)
        start = client["step"]
        print(f"[rank {rank}] resumed at step {start}", flush=True)
    train(engine, start, STEPS, rank, world)
    weights = full_weights(model, engine)
    if rank == 0:
        torch.save(weights, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
