"""The strategy protocol every kind of parallelism implements, and what the engine lends a strategy for
a step (plain torch; worker process). See `openclaw.engine.parallel` for what a strategy does."""
from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from openclaw.engine.models import retie, tied_parameters
from openclaw.engine.noise import LocalGrad
from openclaw.engine.state import seed_all

Batch = dict[str, torch.Tensor]


@dataclass
class StepFns:
    """The engine's side of a step: the task, device placement, precision and the loss's scale."""
    task: Any
    """The `engine.tasks.Task`: loss sums over samples; the built-in ones also split a batch into the
    model's input and the targets (`split`) and score an output (`output_loss`)."""
    to_device: Callable[[Batch], Batch]
    autocast: Callable[..., ContextManager]
    """The step's precision: `autocast()`, or `autocast(cache=False)` around a whole pipeline schedule,
    whose sharded stages free and gather their weights again between micro-batches."""
    loss_scale: float
    """data-parallel degree / global batch: with gradients averaged over the data-parallel ranks, the
    gradient is the mean over the global batch."""
    scaler: torch.amp.GradScaler
    seeds: list[int] = field(default_factory=list)
    """The step's micro-batches' seeds, in order (`Engine.train_step`): each `loss` takes the next one, so
    that a micro-batch's dropout follows its samples, not the rank and the order it ran in (a pipeline
    takes them all, for its chunks: `pp_stage.chunk_seeds`)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        if self.seeds:
            seed_all(self.seeds.pop(0))
        with self.autocast():
            return self.task.loss(model, self.to_device(batch))

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss * self.loss_scale).backward()

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        with self.autocast():
            return self.task.eval_sums(model, self.to_device(batch))


class CommClock:
    """This rank's exposed collective time: how long its step waited on communication that computing did
    not hide (its own transfer, and waiting for slower ranks to arrive). A strategy that measures it
    marks when it handed the last collective over (`launched`) and when its step could go on (`done`), or
    adds a blocking collective's wall time (`add`). On a GPU the marks are CUDA events on the compute
    stream (`stream`: the current one at each mark unless given), read (one synchronization) only when
    the window is logged; on a CPU, wall time. `event` replaces `torch.cuda.Event` (a class with its
    `record(stream)`, `synchronize()` and `elapsed_time(end)` in ms): the event path on a machine without
    a GPU."""

    def __init__(self, device: torch.device | None = None, stream: Any = None, event: Any = None):
        self.events = event is not None or (device is not None and device.type == "cuda")
        self._event = event or (torch.cuda.Event if self.events else None)
        self.stream = stream
        self.seconds, self._marks, self._launched = 0.0, [], None

    def _mark(self):
        if not self.events:
            return time.perf_counter()
        e = self._event(enable_timing=True)
        e.record(self.stream)
        return e

    def launched(self) -> None:
        self._launched = self._mark()

    def done(self) -> None:
        """The step goes on: the time since the last `launched` (if any, this step) was exposed."""
        start, self._launched = self._launched, None
        if start is None:
            return
        if self.events:
            self._marks.append((start, self._mark()))
        else:
            self.seconds += time.perf_counter() - start

    def add(self, seconds: float) -> None:
        self.seconds += seconds

    def take(self) -> float:
        """The exposed seconds since the last `take`."""
        for start, end in self._marks:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000
        total, self.seconds, self._marks = self.seconds, 0.0, []
        return total


class Strategy(Protocol):
    name: str
    sharded: bool
    """True when every rank holds its own part of the state (checkpoints are written by every rank,
    through torch.distributed.checkpoint); False when every rank holds all of it (rank 0 writes)."""

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model, on `device`, spread over the ranks of the default process group (if any)."""

    def forward_backward(self, model: nn.Module, micro_batches: list[Batch],
                         fns: StepFns) -> tuple[list[torch.Tensor], int]:
        """Forward and backward every micro-batch; gradients are synchronized after the last. Returns
        each micro-batch's (detached) loss sum and the samples seen, for this rank's share of the batch."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """The global gradient norm (over every rank's gradients), clipped to `max_norm` unless None."""

    def local_grad(self) -> LocalGrad | None:
        """From the last `forward_backward`: a gradient this rank computed on part of the global batch,
        before any synchronization (the gradient noise scale's small batch, `engine.noise`); None where
        the strategy cannot measure one, or there is none (one rank and one micro-batch)."""

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], fns: StepFns) -> dict[str, float]:
        """Sums of the task's eval metrics over `batches` (this rank's share)."""

    def take_comm_s(self) -> float | None:
        """Seconds this rank's steps waited on collectives since the last call (see `CommClock`); None
        where the strategy does not measure it."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside the wrapper (for a pipeline: this rank's first stage)."""

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """{"model": ..., "optimizer": ...}: whole tensors when not `sharded`, else this rank's shards
        keyed by parameter name (what torch.distributed.checkpoint saves and loads into)."""

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a `state_dict` (for sharded strategies: one filled by torch.distributed.checkpoint)."""

    def load_full_model(self, model: nn.Module, state: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
        """Load a whole model's state dict (its initial weights: after the wrap of a model built on the meta
        device, and on a rollback before the first checkpoint). `from_rank0` (sharded strategies): only
        rank 0's `state` holds the weights; it sends each tensor in turn and every rank keeps its part."""


def on_meta(module: nn.Module) -> bool:
    """Whether `module` was built on the meta device (shapes, no weights)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def place(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` on `device`: moved there; or, where it was built on the meta device (its weights come
    after the wrap, `load_full_model(..., from_rank0=True)`), given memory there, uninitialized, its tied
    parameters tied again (`to_empty` makes a tensor per name)."""
    if not on_meta(module):
        return module.to(device)
    tied = tied_parameters(module)
    module.to_empty(device=device)
    retie(module, tied)
    return module


def evaluate_each(model: nn.Module, batches: Iterable[Batch], fns: StepFns, alike: bool = False) -> dict[str, float]:
    """Evaluation where every rank runs the whole model (all but pipelines). `alike`: its forward holds
    collectives over data-parallel ranks (FSDP's all-gathers), whose shares may differ by a micro-batch:
    every rank runs as many forwards as the one with the most (`as_many_as_any_rank`)."""
    totals: dict[str, float] = {}
    device = next(model.parameters()).device
    for batch, counted in as_many_as_any_rank(batches, device) if alike else ((b, True) for b in batches):
        sums = fns.eval_sums(model, batch)
        for k, v in sums.items() if counted else ():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def as_many_as_any_rank(items: Iterable[Any], device: torch.device) -> Iterator[tuple[Any, bool]]:
    """(item, counted) for each of this rank's items, then (its last item again, False) until every rank
    has run out: each rank runs as many forwards as the rank with the most, so collectives inside them
    pair up, and the extra ones count nowhere. Every rank holds at least one item. Collective: one
    all-reduce of a flag per item, over every rank (a no-op on one)."""
    last, many = None, dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for item in itertools.chain(items, itertools.repeat(None)):
        if many:
            more = torch.tensor([int(item is not None)], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
        elif item is None:
            return
        last = item if item is not None else last
        yield last, item is not None


def no_context() -> ContextManager:
    return contextlib.nullcontext()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: `model.blocks` (the built-in gpt), else none (the root
    alone is one FSDP unit)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleDict):
        return list(blocks.values())
    return list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else []


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """`full`: every block (`transformer_blocks`) recomputes its activations in the backward; `selective`:
    every other block, each given a `checkpointed` flag (`recomputable`) the first time. A model with no
    blocks is refused before any worker starts (`layout_checks`)."""
    if mode == "none":
        return
    for i, block in enumerate(transformer_blocks(model)):
        if not hasattr(block, "checkpointed"):
            recomputable(block)
        block.checkpointed = mode == "full" or i % 2 == 0


def recomputable(block: nn.Module) -> None:
    """Give a block (the built-in gpt's or a user's) a `checkpointed` flag (off) that its forward honours
    by running under torch's non-reentrant `checkpoint`, so that the backward recomputes its activations
    instead of keeping them. The module, its parameters and their names stay as they are. The recompute
    runs in training mode: the running statistics of the block's norms (BatchNorm's) are put back after
    it, so they take each batch in once, as without checkpointing. (Compiled, torch's own recompute
    replays no buffer update, and takes no `context_fn`.)"""
    inner = block.forward
    norms = [m for m in block.modules() if getattr(m, "track_running_stats", False)]

    def contexts() -> tuple[ContextManager, ContextManager]:
        return contextlib.nullcontext(), _statistics_kept(norms)

    def forward(*args, **kwargs):
        if block.checkpointed and torch.is_grad_enabled():
            if norms and not torch.compiler.is_compiling():
                return checkpoint(inner, *args, use_reentrant=False, context_fn=contexts, **kwargs)
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)
    block.checkpointed = False
    block.forward = forward


@contextlib.contextmanager
def _statistics_kept(norms: list[nn.Module]) -> Iterator[None]:
    """The norms' running statistics (their buffers) as they were before, after whatever runs inside."""
    kept = [(b, b.clone()) for m in norms for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, before in kept:
                b.copy_(before)
