"""How long a pipeline stage waits in a step (plain torch; worker process).

A stage computes in its chunks (each micro-batch's forward and backward: `PipelineStage.forward_one_chunk`,
`backward_one_chunk`, `backward_weight_one_chunk`) and, on the last stage, in the loss between them.
The rest of its step it waits: for its neighbours' activations and gradients (their transfer, and the
pipeline filling and draining, the bubble), and for the step's closing collectives (the tied
gradients' sum, the loss's broadcast). `WaitingStage` marks the start and end of each chunk in the
strategy's `CommClock`, which counts the gaps: wall time on a CPU; on a GPU, CUDA events on the compute
stream, whose gaps are the stream's waits on the transfers (the host runs ahead of the kernels).

It also seeds each chunk's forward (`seeds`), as `StepFns.loss` seeds a micro-batch's.
"""
from __future__ import annotations

import contextlib

from torch.distributed.pipelining import PipelineStage

from openclaw.engine.parallel.base import CommClock
from openclaw.engine.state import seed_all, stage_seed


@contextlib.contextmanager
def computing(clock: CommClock | None):
    """Inside: this rank computes (the wait before it ends, the one after it starts)."""
    if clock is None:
        yield
        return
    clock.done()
    try:
        yield
    finally:
        clock.launched()


class WaitingStage(PipelineStage):
    """torch's stage, its chunks marked in `clock` while a training step runs (None: not marked)."""

    clock: CommClock | None = None
    seeds: list[int] = []
    """The step's chunks' seeds (`PipelineStrategy.forward_backward`; none in evaluation): each chunk's
    forward draws (dropout) from its own, mixed with the stage's index, so that the same samples draw the
    same masks whichever data-parallel rank runs them (an activation-checkpointed block's recompute
    restores the state it drew from)."""

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        if self.seeds:
            seed_all(stage_seed(self.seeds[fwd_chunk_id], self.stage_index))
        with computing(self.clock):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        with computing(self.clock):
            return super().backward_one_chunk(*args, **kwargs)

    def backward_weight_one_chunk(self, *args, **kwargs):
        with computing(self.clock):
            return super().backward_weight_one_chunk(*args, **kwargs)
