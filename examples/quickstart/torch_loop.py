"""Plain PyTorch: SARA on the attention and MLP matrices, a training loop, a checkpoint, and a bit-exact resume."""
import torch
import torch.nn as nn

import sara_ds


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.attn = nn.Linear(d, d)  # the papers' rule projects modules named attn / mlp
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(256, 64), Block(), Block(), nn.Linear(64, 256))
    groups = sara_ds.param_groups(model, rank=16, update_proj_gap=50, scale=0.25)  # the rest at full rank
    return model, sara_ds.SaraAdamW(groups, lr=3e-3, preset="sara")


def batch(step):
    """Sequences whose next token is (5 x + 3) mod 256: learnable, so the loss falls."""
    start = torch.randint(0, 256, (8, 1), generator=torch.Generator().manual_seed(step))
    tokens = [start]
    for _ in range(32):
        tokens.append((5 * tokens[-1] + 3) % 256)
    return torch.cat(tokens, dim=1)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        tokens = batch(step)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


model, opt = build()
print(f"loss after 100 steps: {train(model, opt, 100):.3f}")
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "sara_checkpoint.pt")
straight = train(model, opt, 60, start=100)

model, opt = build()  # a fresh process would do the same
saved = torch.load("sara_checkpoint.pt", weights_only=True)
model.load_state_dict(saved["model"])
opt.load_state_dict(saved["optimizer"])
resumed = train(model, opt, 60, start=100)
print(f"loss after 160 steps: {straight:.4f} straight, {resumed:.4f} resumed; {opt.refresh_counts()}")
assert resumed == straight
