"""DeepSpeed: SaraAdamW named in the config JSON, ZeRO-2, a checkpoint and its resume.

    deepspeed --num_gpus 2 examples/quickstart/deepspeed_zero.py --deepspeed_config examples/quickstart/deepspeed.json
"""
import argparse
import os
import sys

import deepspeed
import torch

import sara_ds  # registers "SaraAdamW", "SaraAdafactor" and "SaraAdamMini" for the config's optimizer.type
from sara_ds.integrations import deepspeed as sara_deepspeed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_loop import batch, build  # noqa: E402  (the same model and data as the plain PyTorch quick-start)

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=0)
deepspeed.add_config_arguments(parser)
args = parser.parse_args()
sara_deepspeed.prepare_cpu_launch()  # skips DeepSpeed's CPU-only JIT build of an op training never uses; no-op on GPUs
deepspeed.init_distributed()
model, _ = build()
engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()


def train(steps, start=0):
    for step in range(start, start + steps):
        tokens = batch(step).chunk(world)[rank]  # each data-parallel rank its slice of the batch
        logits = engine(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    return loss.item()


loss = train(100)
sara_deepspeed.save_checkpoint(engine, "ckpt", tag="step100")  # `latest` moves only once every rank has written
sara_deepspeed.load_checkpoint(engine, "ckpt")  # checks every file is whole, then engine.load_checkpoint
optimizer = engine.optimizer.optimizer  # the SaraAdamW that ZeRO wraps
if rank == 0:
    print(f"loss after 100 steps: {loss:.3f}; {type(optimizer).__name__} under {type(engine.optimizer).__name__}, "
          f"{optimizer.refresh_counts()}")
torch.distributed.destroy_process_group()
