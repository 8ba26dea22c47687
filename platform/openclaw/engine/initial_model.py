"""The model a worker builds for its strategy to wrap, and where its initial weights come from (plain
torch; worker process).

Under DDP every rank holds the whole model, so every rank builds it, from the run's seed. Under a
sharded strategy (FSDP, tensor or pipeline parallelism) over more than one rank, a rank holds only its
part: building the whole model on every rank would put one whole copy per worker in the host's memory
(eight copies of a 70B model on an 8-GPU node). There every rank builds the model on the meta device
(shapes, no memory) and the wrap gives each rank memory for its own part. Its weights come after: from
the checkpoint a restart resumes from (no rank builds the whole model then), or, on a fresh start,
from rank 0 alone, which builds the whole model on the host (`rank0_weights`) and sends the weights one
tensor at a time into the parts (`Engine.start_over(weights, from_rank0=True)`). They are the weights
every rank would have built (the same constructor and seed), so a run is the same at any layout.

A model whose constructor cannot run on the meta device (it reads or loads a value), or that keeps
buffers outside its state dict (which nothing would send), is built whole on every rank, as under DDP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from openclaw.engine.models import build_model, build_on_meta


@dataclass
class InitialModel:
    model: nn.Module
    """What the strategy wraps: the whole model, with its initial weights, or the model on the meta device."""
    on_meta: bool = False
    """Built on the meta device: its weights are loaded after the wrap, from a checkpoint or `rank0_weights`."""


def whole_on_rank0_only(sharded: bool, world: int) -> bool:
    """Whether only rank 0 builds the whole model: a strategy whose ranks each hold a part, over more
    than one rank."""
    return sharded and world > 1


def initial_model(name: str, kwargs: dict[str, Any], *, seed: int, world: int, sharded: bool) -> InitialModel:
    """The model for the strategy to wrap (see the module docstring); a whole one is built from `seed`."""
    if whole_on_rank0_only(sharded, world):
        meta = _on_meta(name, kwargs)
        if meta is not None:
            return InitialModel(meta, on_meta=True)
    torch.manual_seed(seed)
    return InitialModel(build_model(name, kwargs))


def rank0_weights(name: str, kwargs: dict[str, Any], *, seed: int, rank: int) -> dict[str, torch.Tensor]:
    """The initial weights of a model built on the meta device: built whole from `seed` on rank 0, {} on
    the other ranks (rank 0 sends them, `Engine.start_over(..., from_rank0=True)`)."""
    if rank != 0:
        return {}
    torch.manual_seed(seed)
    return build_model(name, kwargs).state_dict()


def _on_meta(name: str, kwargs: dict[str, Any]) -> nn.Module | None:
    """The model on the meta device, or None where it must be built whole: its constructor failed there,
    or it has buffers its state dict leaves out (`persistent=False`)."""
    model = build_on_meta(name, kwargs)
    return None if model is None or set(dict(model.named_buffers())) - set(model.state_dict()) else model
