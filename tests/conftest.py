import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


class ShapesNet(torch.nn.Module):
    """Tall (out > in), wide (out < in) and square weights, plus biases and a norm-like vector."""

    def __init__(self):
        super().__init__()
        self.attn_square = torch.nn.Linear(12, 12)
        self.mlp_tall = torch.nn.Linear(12, 20)
        self.mlp_wide = torch.nn.Linear(20, 6)
        self.gain = torch.nn.Parameter(torch.ones(6))

    def forward(self, x):
        return (self.mlp_wide(torch.tanh(self.mlp_tall(torch.tanh(self.attn_square(x))))) * self.gain)


@pytest.fixture
def shapes_net():
    torch.manual_seed(0)
    return ShapesNet()


def galore_groups(model, rank=4, gap=3, scale=0.25, **extra):
    proj = [model.attn_square.weight, model.mlp_tall.weight, model.mlp_wide.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in proj)]
    return [{"params": rest}, dict(params=proj, rank=rank, update_proj_gap=gap, scale=scale, proj_type="std", **extra)]


def batch(step, n=16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 12, generator=g), torch.randn(n, 6, generator=g)


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
