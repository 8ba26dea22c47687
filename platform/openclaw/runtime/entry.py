"""Ray Train's training function as handed to Ray Train (run in every worker process; the Ray Train
controller only unpickles it).

Ray Train pickles the training function and its `train_loop_config` into the controller's arguments, and
the controller unpickles them when it starts. A function is pickled by reference, so a reference to
`runtime.loop.train_loop` made the controller import the whole engine (torch.distributed.checkpoint,
DTensor, pipelining, dynamo: about 2 s of its 5 s start on 2 cores, on the CPUs the run's workers start
on) for a function it never calls. This module imports nothing: the worker imports the loop on its call.
"""
from __future__ import annotations

from typing import Any


def train_loop(loop_config: dict[str, Any]) -> None:
    """Run `runtime.loop.train_loop` (`loop_config` is {"inputs": LoopInputs})."""
    from openclaw.runtime.loop import train_loop as loop
    loop(loop_config)
