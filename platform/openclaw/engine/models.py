"""Built-in models (`mlp`, `gpt`), and `build_model` for them and a user's `module:function` (worker,
and the driver's preflight that checks a model builds)."""
from __future__ import annotations

import inspect
import math
import typing
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


class _Attention(nn.Module):
    """Causal self-attention with separate q, k and v projections: tensor parallelism splits each of them
    by heads (column-wise), so under it `view(..., -1, head_dim)` sees this worker's heads only.

    The key projection has no bias: softmax ignores a constant added to all of a query's scores, so a key
    bias only ever gets a zero gradient (and Adam would turn its rounding noise into steps)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.head_dim, self.dropout = dim // heads, dropout
        self.q, self.v, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, -1, self.head_dim).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(att.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """A pre-norm transformer block (`parallelism.activation_checkpointing` makes it recompute its
    activations in the backward, as any model's blocks: `parallel.base.recomputable`)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only transformer over a byte (or any small) vocabulary.

    A pipeline stage is a GPT with the parts of other stages removed (set to None, and blocks deleted
    from `blocks`, which is keyed by the block's index in the whole model): its forward runs what it
    holds, and its parameter names stay those of the whole model.
    """

    pipeline_ends = (("tok", "pos"), ("ln", "head"))
    """What runs before the blocks and after them: the first and the last pipeline stage's modules."""

    def __init__(self, vocab_size: int = 256, block_size: int = 128, dim: int = 128, depth: int = 4,
                 heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"`model.kwargs.dim` ({dim}) must be divisible by `model.kwargs.heads` ({heads}).")
        self.block_size, self.dim, self.heads, self.depth = block_size, dim, heads, depth
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleDict({str(i): Block(dim, heads, dropout) for i in range(depth)})
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, x: torch.Tensor, blocks: list[str] | None = None, embed: bool | None = None,
                head: bool | None = None) -> torch.Tensor:
        """Token ids to logits; a pipeline stage runs only `blocks` (of those it holds), and embeds or
        applies the head only when told (by default: when it holds them)."""
        if self.tok is not None if embed is None else embed:
            if x.shape[1] > self.block_size:  # the position embedding has `block_size` rows
                raise ConfigError(f"`model.kwargs.block_size` ({self.block_size}) is shorter than the data's "
                                  f"sequences ({x.shape[1]} tokens): set it to at least {x.shape[1]}.")
            x = self.tok(x.long()) + self.pos(torch.arange(x.shape[1], device=x.device))
        for key in self.blocks if blocks is None else blocks:
            x = self.blocks[key](x)
        if self.head is not None if head is None else head:
            x = self.head(self.ln(x))
        return x

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6N plus attention), for MFU."""
        n = sum(p.numel() for p in self.parameters()) - self.pos.weight.numel()
        return 6 * n + 12 * self.depth * self.dim * self.block_size


def tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(first name, other name) of every parameter reachable under two names (the gpt's head and embedding)."""
    first: dict[int, str] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append((first[id(p)], name))
        else:
            first[id(p)] = name
    return pairs


def retie(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Make each (owner, alias) pair one parameter again, after something replaced them one by one."""
    for owner, alias in pairs:
        module, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module) if module else model, attr, model.get_parameter(owner))


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "gpt": GPT}


def check_builtin_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """A built-in model's kwargs, each by its constructor's annotation: an integer size at least 1 (a
    depth at least 0), a dropout in [0, 1); a `ConfigError` naming the key otherwise (where the
    constructor would fail with a message about its own arithmetic, or build something unusable)."""
    hints = typing.get_type_hints(BUILTIN[name].__init__)
    for key, value in kwargs.items():
        if key not in hints:
            raise ConfigError(f"`model.kwargs.{key}` is not an argument of the built-in {name!r}, which takes "
                              f"{', '.join(k for k in hints if k != 'return')}.")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if hints[key] is int and not (number and isinstance(value, int)) or not number:
            raise ConfigError(f"`model.kwargs.{key}` must be {'an integer' if hints[key] is int else 'a number'} "
                              f"(got {value!r}).")
        low, high = (0, 1) if key == "dropout" else (0 if key == "depth" else 1, None)
        if value < low or (high is not None and value >= high):
            raise ConfigError(f"`model.kwargs.{key}` must be " + (f"in [{low}, {high})" if high else f"at least {low}")
                              + f" (got {value!r}).")


def with_defaults(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A built-in model's kwargs with each argument its constructor defaults filled in (pure): two configs
    that build the same model compare equal, whether or not they write a default out. A user's model's
    kwargs as given."""
    if name not in BUILTIN:
        return dict(kwargs)
    params = inspect.signature(BUILTIN[name]).parameters.values()
    return {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **kwargs}


def build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if name in BUILTIN:
        check_builtin_kwargs(name, kwargs)
    builder = BUILTIN.get(name) or import_path(name, "model.name")
    try:
        model = builder(**kwargs)
    except TypeError as e:
        raise ConfigError(f"`model.kwargs` do not fit model {name!r}: {e}.") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model.name` {name!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def build_on_meta(name: str, kwargs: dict[str, Any]) -> nn.Module | None:
    """The model built on the meta device (shapes, no memory for its weights, whatever its size), or None
    where its constructor cannot run there (it reads or loads a value). A `ConfigError` (its kwargs do
    not fit, it is no module) is raised as `build_model` raises it."""
    try:
        with torch.device("meta"):
            return build_model(name, kwargs)
    except ConfigError:
        raise
    except Exception:  # the constructor reads (or loads) a value the meta device does not hold
        return None
