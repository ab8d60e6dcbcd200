"""A small LLaMA-style decoder (pre-RMSNorm, rotary attention, SwiGLU) for examples and tests.

Module names follow the GaLore protocol (``attn``/``mlp``), so ``sara_ds.param_groups``
projects q, k, v, o, gate, up and down, and leaves embeddings, norms and the head alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def swiglu_width(hidden: int) -> int:
    """LLaMA's SwiGLU intermediate size: 8/3 * hidden, rounded up to a multiple of 8."""
    return ((8 * hidden // 3 + 7) // 8) * 8


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 344  # 8/3 * hidden, rounded up to a multiple of 8
    max_seq: int = 256
    rope_base: float = 10000.0


# Layer shapes of the GaLore C4 protocol models (hidden, intermediate, heads, layers).
PAPER_SIZES = {
    "60m": LlamaConfig(vocab_size=32000, hidden=512, intermediate=1376, heads=8, layers=8),
    "130m": LlamaConfig(vocab_size=32000, hidden=768, intermediate=2048, heads=12, layers=12),
    "350m": LlamaConfig(vocab_size=32000, hidden=1024, intermediate=2736, heads=16, layers=24),
    "1b": LlamaConfig(vocab_size=32000, hidden=2048, intermediate=5461, heads=32, layers=24),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def rotary(x, base: float):
    b, h, t, d = x.shape
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.base = cfg.heads, cfg.rope_base
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.o_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        head_dim = c // self.heads
        # -1 heads: under tensor parallelism (AutoTP) q/k/v hold only this rank's heads
        split = lambda y: y.view(b, t, -1, head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = rotary(q, self.base), rotary(k, self.base)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.hidden), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.hidden), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens, targets=None):
        x = self.embed_tokens(tokens)
        for block in self.layers:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def parallelize(model: Llama, tp_mesh) -> None:
    """Megatron's tensor-parallel split of the model over ``tp_mesh`` (torch's ``parallelize_module``): q, k, v,
    gate and up column-wise, o and down row-wise (each block's attention and MLP then need one all-reduce), and a
    vocab-parallel head whose logits are gathered. ``heads``, ``hidden`` and ``intermediate`` must divide by the
    TP size."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)
    parallelize_module(model, tp_mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
