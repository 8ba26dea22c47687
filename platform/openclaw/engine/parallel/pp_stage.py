"""A pipeline stage's forward over a rank's pruned model, and what passes between stages (plain torch; worker
process): the stage view the schedules run, the slices of the sequence or vocabulary a tensor-parallel
rank passes on, the parameters tied across the first and last stages, and the seeds of a step's chunks
(`pp.PipelineStrategy`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from openclaw.engine.models import GPT, tied_parameters
from openclaw.engine.parallel.layout_checks import pipeline_ends, stage_part
from openclaw.engine.state import later_seed


class StageView(nn.Module):
    """One stage's forward over the rank's pruned model (the stage's blocks, and the ends it holds). The
    gpt is told which blocks and ends to run; a user's model runs as it is, seeing only this stage's
    (`_as_stage`), so a rank may hold two stages of it (interleaved 1F1B). Under tensor parallelism (`tp`:
    its mesh) what passes between the gpt's stages is this rank's slice of the sequence as a plain tensor,
    made a DTensor again for the blocks; a user's stage passes on its output's local tensor (what its
    `parallelize_plan` leaves: whole, with torch's default output layouts)."""

    seq = 0
    """The step's sequence length (`PipelineStrategy._run` sets it): the whole of the slices passed on."""

    def __init__(self, model: nn.Module, blocks: list[str], first: bool, last: bool, tp: DeviceMesh | None = None):
        super().__init__()
        self.subset = isinstance(model, GPT)  # told which stage to run; else sees only this stage's parts
        self.model, self.blocks, self.first, self.last = model, blocks, first, last
        self.tp = tp if self.subset else None  # a user's stages pass on what its plan leaves, as a plain tensor
        starts, ends = pipeline_ends(model)
        self.hidden = [m for m in starts if not first] + [m for m in ends if not last]
        """The ends this stage does not run (a user's model): None while it runs."""
        object.__setattr__(self, "stage_blocks", nn.ModuleDict({k: model.blocks[k] for k in blocks}))
        """This stage's blocks, as the model's `blocks` while it runs (not a submodule of the view: the
        model holds them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None and not self.first:
            x = from_slices(x, self.tp, 1, self.seq)
        if self.subset:
            out = self.model(x, blocks=self.blocks, embed=self.first, head=self.last)
        else:
            with _as_stage(self.model, self.stage_blocks, self.hidden):
                out = self.model(x)
        return out.to_local() if isinstance(out, DTensor) else out


@contextlib.contextmanager
def _as_stage(model: nn.Module, blocks: nn.ModuleDict, hidden: list[str]) -> Iterator[None]:
    """`model` as one of its stages' forward must see it: `blocks` its blocks, each end in `hidden` None.
    Each is set as an instance attribute, which Python finds before nn.Module's registered submodules, so
    the module tree is untouched: FSDP, state dicts and the optimizer see every module the rank holds."""
    owners = [(model, "blocks", blocks)]
    for name in hidden:
        parent, _, attr = name.rpartition(".")
        owners.append((model.get_submodule(parent) if parent else model, attr, None))
    for owner, attr, value in owners:
        owner.__dict__[attr] = value
    try:
        yield
    finally:
        for owner, attr, _ in owners:
            owner.__dict__.pop(attr, None)


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


def held_plan(plan: dict, part: nn.Module) -> dict:
    """A user's `parallelize_plan`, asked of the whole model, for a pipeline stage's part: the entries for
    the modules the part holds (and every pattern: torch matches those against what is there). Those for
    other stages' blocks and ends are left out, which torch would otherwise warn of, one by one."""
    def held(path: str) -> bool:
        try:
            return any(ch in path for ch in "*?[") or part.get_submodule(path) is not None
        except AttributeError:
            return False
    return {path: style for path, style in plan.items() if held(path)}


def agree_on_overflow(params: Iterator[nn.Parameter], scaler: torch.amp.GradScaler, group) -> None:
    """fp16: every stage's loss scaler sees an overflow that any stage's gradients hold. Each scaler checks
    only its own stage's gradients (FSDP's and tensor parallelism's DTensors agree over their own mesh,
    not over stages): one stage would skip its update and lower its scale while the others stepped and
    kept theirs, and from then on the lower-scaled stage's gradients unscale too large. A stage that
    saw none while another did marks one of its gradients non-finite, so every scaler skips and lowers
    alike. Only the last stage scales a loss: the others' scalers make their scale here (a GradScaler
    makes it at its first `scale`). Collective over the pipeline group; no device-to-host read."""
    if not scaler.is_enabled():
        return
    grads = [g.to_local() if isinstance(g, DTensor) else g for p in params if (g := p.grad) is not None]
    grads = [g for g in grads if g.numel()]
    scaler.scale(torch.ones((), device=grads[0].device))  # this stage's scale, for `unscale_`
    seen = (~torch.isfinite(nn.utils.get_total_norm(grads))).float()
    torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX, group=group)
    first = grads[0].view(-1)[:1]
    first.copy_(torch.where(seen > 0, torch.full_like(first, float("inf")), first))


def chunk_seeds(seeds: list[int], micro_rows: int, rows: int, chunks: int) -> list[int]:
    """The seeds of a pipeline step's `chunks` chunks of a rank's `rows` rows, cut as the schedule cuts
    them (`torch.tensor_split`: the first `rows % chunks` one row longer), from the seeds of the rank's
    micro-batches of `micro_rows` rows each (`engine.state.micro_batch_seed`): each chunk's is the seed
    of the sample it starts at, so its masks follow its samples as a micro-batch's do. None given: none."""
    if not seeds:
        return []
    size, longer = divmod(rows, chunks)
    starts = [i * size + min(i, longer) for i in range(chunks)]
    return [later_seed(seeds[s // micro_rows], s % micro_rows) for s in starts]


def rechunk(batches, fns, rows: int | None, micro_batches: int):
    """(inputs, targets, real rows) in chunks of exactly `micro_batches` x `rows` (`rows`: the first
    batch's size if unset): a pipeline's evaluation passes (`fns`: the engine's `StepFns`)."""
    x = y = None
    size = rows * micro_batches if rows else 0
    for batch in batches:
        bx, by = fns.task.split(fns.to_device(batch))
        size = size or len(bx) * micro_batches
        x, y = (bx, by) if x is None else (torch.cat([x, bx]), torch.cat([y, by]))
        while len(x) >= size:
            yield x[:size], y[:size], size
            x, y = x[size:], y[size:]
    if x is not None and len(x):
        pad = size - len(x)
        yield (torch.cat([x, x[:1].expand(pad, *x.shape[1:])]),
               torch.cat([y, torch.full((pad, *y.shape[1:]), -100, dtype=y.dtype, device=y.device)]), len(x))
