"""Gradient clipping by the global norm, whatever the gradients' layout over the ranks (plain torch;
worker process): whole tensors, DTensors sharded on any mesh (FSDP, tensor parallelism, both), and
pipeline stages that each hold different parameters. The norm costs a collective per sharded mesh
dimension, not one per parameter: on gloo, one per parameter was a tenth of an FSDP step
(`bench/fsdp_vs_bare.py`)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def clip_global(params: Iterable[nn.Parameter], max_norm: float | None, *, sum_over: Iterable = (),
                exclude: Iterable[nn.Parameter] = ()) -> torch.Tensor:
    """The global L2 norm of the gradients, and (unless `max_norm` is None) every gradient scaled so that
    it is at most `max_norm`.

    A DTensor gradient's squares are summed over the mesh dimensions it is sharded on (`_squared_norm`);
    a plain gradient is the same on every rank that holds it and counts once. `sum_over`: process
    groups whose ranks hold different parameters (pipeline stages): their squared norms are summed.
    `exclude`: parameters counted on another rank (the last stage's copy of a tied embedding), still
    scaled.
    """
    params = [p for p in params if p.grad is not None]
    reduce_partial_grads(params)
    skip = {id(p) for p in exclude}
    squared = _squared_norm([p for p in params if id(p) not in skip],
                            params[0].grad.device if params else torch.device("cpu"))
    for group in sum_over:
        dist.all_reduce(squared, group=group)
    total = squared.sqrt().float()
    if max_norm is not None:
        by_mesh: dict[Any, list[nn.Parameter]] = {}  # foreach kernels refuse mixed tensor kinds and meshes
        for p in params:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        for group_params in by_mesh.values():
            nn.utils.clip_grads_with_norm_(group_params, max_norm, total)
    return total


def _squared_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """The squared L2 norm of the parameters' gradients over every rank, in float64, with one all-reduce
    per mesh dimension the gradients are sharded over (not one per parameter): this rank's squares are
    summed first, by mesh and sharded dimensions, then over each sharded dimension's group. A gradient
    replicated over a dimension counts once (`reduce_partial_grads` left none partial)."""
    squared = torch.zeros((), dtype=torch.float64, device=device)
    sharded: dict[tuple[Any, tuple[int, ...]], list[torch.Tensor]] = {}  # by mesh (equal, not one object per unit)
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            # sharded over every dimension it is not replicated on (`_StridedShard`, FSDP's shard of a tensor
            # parallel shard, is not `is_shard()`)
            dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            local = torch.linalg.vector_norm(g.to_local(), dtype=torch.float64)
            sharded.setdefault((g.device_mesh, dims), []).append(local ** 2)
        else:
            squared += torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
    for (mesh, dims), squares in sharded.items():
        local = torch.stack(squares).sum()
        for dim in dims:
            dist.all_reduce(local, group=mesh.get_group(dim))
        squared += local
    return squared


def reduce_partial_grads(params: list[nn.Parameter]) -> None:
    """Sum the gradients left as partial sums over a mesh dimension (sequence parallelism leaves the
    norms' gradients so, one partial sum per tensor-parallel rank), all of a kind in one all-reduce, and
    keep them replicated. Left partial, each would be reduced on its own by the norm, and again by each
    optimizer op that reads it (three per AdamW step)."""
    groups: dict[tuple[Any, tuple, torch.dtype], list[nn.Parameter]] = {}
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            groups.setdefault((g.device_mesh, tuple(g.placements), g.dtype), []).append(p)
    for (mesh, placements, _), group in groups.items():
        whole = tuple(Replicate() if pl.is_partial() else pl for pl in placements)
        if any(pl.is_partial() and pl.reduce_op != "sum" for pl in placements):  # none seen: one at a time
            for p in group:
                p.grad = p.grad.redistribute(mesh, whole)
            continue
        flat = torch.cat([p.grad.to_local().reshape(-1) for p in group])
        for dim, pl in enumerate(placements):
            if pl.is_partial():
                dist.all_reduce(flat, group=mesh.get_group(dim))
        offset = 0
        for p in group:
            local = p.grad.to_local()
            summed = flat[offset:offset + local.numel()].view(local.shape)
            offset += local.numel()
            p.grad = DTensor.from_local(summed, mesh, whole, run_check=False, shape=p.grad.shape,
                                        stride=p.grad.stride())
