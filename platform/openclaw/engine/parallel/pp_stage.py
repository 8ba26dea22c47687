"""A pipeline stage's forward over a rank's pruned model, and what passes between stages (plain torch; worker
process): the stage view the schedules run, the slices of the sequence or vocabulary a tensor-parallel
rank passes on, and the parameters tied across the first and last stages (`pp.PipelineStrategy`)."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from openclaw.engine.models import GPT, tied_parameters
from openclaw.engine.parallel.layout_checks import pipeline_ends, stage_part


class StageView(nn.Module):
    """One stage's forward over the rank's pruned model (the stage's blocks, and the ends it holds). Under
    tensor parallelism (`tp`: its mesh) what passes between stages is this rank's slice of the sequence
    as a plain tensor, made a DTensor again for the blocks."""

    seq = 0
    """The step's sequence length (`PipelineStrategy._run` sets it): the whole of the slices passed on."""

    def __init__(self, model: nn.Module, blocks: list[str], first: bool, last: bool, tp: DeviceMesh | None = None):
        super().__init__()
        self.model, self.blocks, self.first, self.last, self.tp = model, blocks, first, last, tp
        self.subset = isinstance(model, GPT)  # runs one of two stages it holds (interleaved); else all it holds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None and not self.first:
            x = from_slices(x, self.tp, 1, self.seq)
        out = self.model(x, blocks=self.blocks, embed=self.first, head=self.last) if self.subset else self.model(x)
        return out.to_local() if isinstance(out, DTensor) else out


def cross_stage_ties(model: nn.Module) -> list[tuple[str, str]]:
    """(the first stage's name, the last stage's name) of each parameter the two share (the gpt's embedding
    and head): each holds a copy."""
    starts, ends = pipeline_ends(model)
    out = []
    for a, b in tied_parameters(model):
        where = (stage_part(a, starts, ends), stage_part(b, starts, ends))
        if where in (("first", "last"), ("last", "first")):
            out.append((a, b) if where[0] == "first" else (b, a))
    return out


def from_slices(local: torch.Tensor, mesh: DeviceMesh, dim: int, whole: int) -> torch.Tensor:
    """This rank's slice along `dim` as the DTensor `Shard(dim)` of a tensor `whole` long there: given
    the whole length, slices need not be even (`from_local` would take every rank's for this one's)."""
    shape = list(local.shape)
    shape[dim] = whole
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return DTensor.from_local(local, mesh, (Shard(dim),), run_check=False, shape=torch.Size(shape),
                              stride=tuple(reversed(strides)))
