"""How long a pipeline stage waits in a step (plain torch; worker process).

A stage computes in its chunks (each micro-batch's forward and backward: `PipelineStage.forward_one_chunk`,
`backward_one_chunk`, `backward_weight_one_chunk`) and, on the last stage, in the loss between them.
The rest of its step it waits: for its neighbours' activations and gradients (their transfer, and the
pipeline filling and draining, the bubble), and for the step's closing collectives (the tied
gradients' sum, the loss's broadcast). `WaitingStage` marks the start and end of each chunk in the
strategy's `CommClock`, which counts the gaps: wall time on a CPU; on a GPU, CUDA events on the compute
stream, whose gaps are the stream's waits on the transfers (the host runs ahead of the kernels).

It also seeds each chunk's forward (`seeds`), as `StepFns.loss` seeds a micro-batch's, and keeps the
stage's buffers out of torch's shape inference (`_forward_metadata_inference`, `EVAL_INFERENCE`).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage

from openclaw.engine.parallel.base import CommClock
from openclaw.engine.parallel.fsdp import kept_buffers
from openclaw.engine.state import seed_all, stage_seed

log = logging.getLogger("openclaw")


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not EVAL_INFERENCE and kept_buffers(self.submod):
            log.warning("this torch (%s) sets pipeline stages up otherwise than torch 2.13: its shape inference may "
                        "update the stage's buffers (BatchNorm's running statistics) with a forward on "
                        "uninitialized tensors", torch.__version__)

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

    def _forward_metadata_inference(self, *args, **kwargs):
        """torch (2.13) learns a stage's output shapes by running its forward on tensors it leaves
        uninitialized (the first stage: on the first micro-batch), each time a schedule sets its stages up:
        at an attempt's first step, and after an evaluation; then its gradients' shapes by a backward
        through that forward (`_backward_metadata_inference`). In training mode BatchNorm's running
        statistics took that forward in (garbage: inf), and a resumed run's differed from the uninterrupted
        one's. Both run in evaluation mode, which computes the same shapes and updates no buffer (put back
        after the forward, the buffers broke torch's backward; the backward in training mode recomputed an
        activation-checkpointed block otherwise than its forward ran). (Private methods of torch's: the
        tests of a pipeline's BatchNorm statistics fail if torch stops calling them; `EVAL_INFERENCE`.)"""
        with _evaluating(self.submod):
            return super()._forward_metadata_inference(*args, **kwargs)

    def _backward_metadata_inference(self, *args, **kwargs):
        with _evaluating(self.submod):
            return super()._backward_metadata_inference(*args, **kwargs)


EVAL_INFERENCE = all(hasattr(PipelineStage, m) for m in ("_forward_metadata_inference", "_backward_metadata_inference"))
"""Whether this torch infers a stage's shapes where `WaitingStage` runs the inference in evaluation mode."""


@contextlib.contextmanager
def _evaluating(module: nn.Module):
    """`module` and every module in it in evaluation mode inside; each put back as it was."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
