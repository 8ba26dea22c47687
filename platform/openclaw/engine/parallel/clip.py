"""Gradient clipping by the global norm, whatever the gradients' layout over the ranks (plain torch;
worker process): whole tensors, DTensors sharded on any mesh (FSDP, tensor parallelism, both), and
pipeline stages that each hold different parameters."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def clip_global(params: Iterable[nn.Parameter], max_norm: float | None, *, sum_over: Iterable = (),
                exclude: Iterable[nn.Parameter] = ()) -> torch.Tensor:
    """The global L2 norm of the gradients, and (unless `max_norm` is None) every gradient scaled so that
    it is at most `max_norm`.

    A DTensor gradient's norm is reduced over its own mesh (`full_tensor`); a plain gradient is the same
    on every rank that holds it and counts once. `sum_over`: process groups whose ranks hold different
    parameters (pipeline stages): their squared norms are summed. `exclude`: parameters counted on
    another rank (the last stage's copy of a tied embedding), still scaled.
    """
    params = [p for p in params if p.grad is not None]
    skip = {id(p) for p in exclude}
    squared = torch.zeros((), dtype=torch.float64, device=params[0].grad.device if params else "cpu")
    for p in params:
        if id(p) not in skip:
            norm = torch.linalg.vector_norm(p.grad, dtype=torch.float64)
            squared += (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    for group in sum_over:
        dist.all_reduce(squared, group=group)
    total = squared.sqrt().float()
    if max_norm is not None:
        by_mesh: dict[int | None, list[nn.Parameter]] = {}  # foreach kernels refuse mixed tensor kinds and meshes
        for p in params:
            by_mesh.setdefault(id(p.grad.device_mesh) if isinstance(p.grad, DTensor) else None, []).append(p)
        for group_params in by_mesh.values():
            nn.utils.clip_grads_with_norm_(group_params, max_norm, total)
    return total
