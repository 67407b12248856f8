"""Train a tiny byte-level language model built from generated energy layers, for a few steps.

Each block is: RMS normalisation, a CEM attention step (generated from cem_attention.py), RMS
normalisation, a CEM MLP step (generated from cem_mlp.py). Run `python -m energyc compile
examples/` first (the checked-in generated/ already holds the result).

    python examples/demo.py [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from generated.cem_attention import Layer as CemAttention  # noqa: E402
from generated.cem_mlp import Layer as CemMlp  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = torch.nn.RMSNorm(dim)
        self.attention = CemAttention(D=dim, H=heads, K=dim // heads, eta=1.0)
        self.norm2 = torch.nn.RMSNorm(dim)
        self.mlp = CemMlp(D=dim, M=2 * dim, eta=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each layer maps h to h - eta dE/dh; add the update to the residual stream
        h = self.norm1(x)
        x = x + (self.attention(h) - h)
        h = self.norm2(x)
        return x + (self.mlp(h) - h)


class TinyLM(torch.nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, dim)
        torch.nn.init.normal_(self.embed.weight, std=dim**-0.5)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = torch.nn.RMSNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # tied embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cem_attention.py"),
              "rb") as fh:
        data = torch.tensor(list(fh.read() * 4), dtype=torch.long)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"TinyLM from generated layers: {n_params} parameters; training {args.steps} steps")
    t0 = time.perf_counter()
    first = None
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,))
        batch = torch.stack([data[s : s + args.seq + 1] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        if step == 1 or step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.1f}s)")
    print(f"loss {first:.3f} -> {loss.item():.3f}")


if __name__ == "__main__":
    main()
