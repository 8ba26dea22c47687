"""Built-in models (`mlp`, `gpt`), and `build_model` for them and a user's `module:function` (worker,
and the driver's preflight that checks a model builds)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from openclaw.errors import ConfigError
from openclaw.user_code import import_path


class MLP(nn.Module):
    """A plain feed-forward classifier."""

    def __init__(self, in_features: int = 64, hidden: int = 128, depth: int = 2, num_classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1).float())


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only transformer over a byte (or any small) vocabulary."""

    def __init__(self, vocab_size: int = 256, block_size: int = 128, dim: int = 128, depth: int = 4,
                 heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"`model.kwargs.dim` ({dim}) must be divisible by `model.kwargs.heads` ({heads}).")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx.long()) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6N plus attention), for MFU."""
        n = sum(p.numel() for p in self.parameters()) - self.pos.weight.numel()
        blk = self.blocks[0]
        return 6 * n + 12 * len(self.blocks) * blk.proj.in_features * self.block_size


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "gpt": GPT}


def build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    builder = BUILTIN.get(name) or import_path(name, "model.name")
    try:
        model = builder(**kwargs)
    except TypeError as e:
        raise ConfigError(f"`model.kwargs` do not fit model {name!r}: {e}.") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model.name` {name!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model
