"""Policies of a training attempt, as pure functions that return decisions (worker process): how a world
size trains (the batch plan of the elastic resize policy), and what a non-finite loss does. The
training loop carries the decisions out, in one place each (`runtime.attempt`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from openclaw.data.sampler import accumulation_steps


@dataclass(frozen=True)
class BatchPlan:
    """How a world size trains: the global batch, the micro-batches per worker, and the LR factor."""
    global_batch_size: int
    accumulation: int
    lr_factor: float


def batch_plan(policy: str, lr_rule: str, global_batch_size: int, micro_batch_size: int, max_workers: int,
               world_size: int) -> BatchPlan:
    """`keep_global_batch`: the global batch and LR stay; accumulation absorbs the world size.

    `scale_lr`: each worker keeps the batch it has at `max_workers` (``global_batch_size / max_workers``),
    so the global batch scales with the world size, and the LR scales by ``world / max_workers``
    (`linear`) or its square root (`sqrt`).
    """
    if policy == "keep_global_batch":
        return BatchPlan(global_batch_size, accumulation_steps(global_batch_size, micro_batch_size, world_size), 1.0)
    if policy != "scale_lr":
        raise ValueError(f"unknown resize policy {policy!r}")
    per_worker = global_batch_size // max_workers
    accumulation = accumulation_steps(global_batch_size, micro_batch_size, max_workers)
    ratio = world_size / max_workers
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio)}[lr_rule]
    return BatchPlan(per_worker * world_size, accumulation, factor)


# ---- a non-finite loss or gradient -------------------------------------------------------------

@dataclass(frozen=True)
class Fail:
    """Stop the run with this message."""
    message: str


@dataclass(frozen=True)
class Skip:
    """Do not apply the step; train on from the next batch (the batch is recorded as skipped)."""
    step: int


@dataclass(frozen=True)
class Rollback:
    """Restore the newest valid checkpoint (the initial state before the first) and replay from there,
    skipping this step's batch."""
    step: int


NonFiniteDecision = Fail | Skip | Rollback


def nonfinite_decision(policy: str, step: int, lr: float) -> NonFiniteDecision:
    """`train.on_nonfinite_loss` for a non-finite loss or gradient norm at global step `step`. Every rank
    decides alike: the grad norm is global."""
    if policy == "fail":
        return Fail(f"non-finite loss or gradient at global step {step} (lr {lr:g}). Lower "
                    f"`train.optimizer.lr`, check the data, or set `train.on_nonfinite_loss` to skip or rollback.")
    if policy == "skip":
        return Skip(step)
    if policy == "rollback":
        return Rollback(step)
    raise ValueError(f"unknown non-finite loss policy {policy!r}")
