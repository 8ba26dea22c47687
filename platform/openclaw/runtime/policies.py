"""Policies of a training attempt, as pure functions that return decisions (worker process): how a world
size trains (the batch plan of the elastic resize policy), what a non-finite loss does, and when an
unstable fp16 run switches to a safer precision. The
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


def micro_batch_dp_sizes(policy: str, worlds: list[int], model_parallel: int) -> list[int]:
    """The data-parallel degrees whose per-rank batch a micro-batch must divide (`batch_plan`'s): every
    world's the run may take (`Config.worlds`) under `keep_global_batch`, only the largest's under
    `scale_lr` (each worker keeps that batch). The data-parallel degree is the world over tensor x pipeline."""
    return sorted({w // model_parallel for w in (worlds if policy == "keep_global_batch" else [max(worlds)])})


# ---- a non-finite loss or gradient -------------------------------------------------------------

@dataclass(frozen=True)
class Fail:
    """Stop the run with this message."""
    message: str


@dataclass(frozen=True)
class Skip:
    """Do not apply the step; train on from the next batch (the batch is recorded as skipped)."""
    step: int
    batch: tuple[int, int, int]
    """Its samples: (epoch, start, stop) in that epoch's sample order."""


@dataclass(frozen=True)
class Rollback:
    """Restore the newest valid checkpoint (the initial state before the first) and replay from there,
    skipping this step's batch."""
    step: int
    batch: tuple[int, int, int]
    """Its samples: (epoch, start, stop) in that epoch's sample order."""


NonFiniteDecision = Fail | Skip | Rollback


def nonfinite_decision(policy: str, step: int, lr: float, batch: tuple[int, int, int]) -> NonFiniteDecision:
    """`train.on_nonfinite_loss` for a non-finite loss or gradient norm at global step `step`, on the samples
    `batch` ((epoch, start, stop) in the epoch's order). Every rank decides alike: the flag is all-reduced."""
    if policy == "fail":
        return Fail(f"non-finite loss or gradient at global step {step} (lr {lr:g}). Lower "
                    f"`train.optimizer.lr`, check the data, or set `train.on_nonfinite_loss` to skip or rollback.")
    if policy == "skip":
        return Skip(step, batch)
    if policy == "rollback":
        return Rollback(step, batch)
    raise ValueError(f"unknown non-finite loss policy {policy!r}")


# ---- precision that adapts to the run ----------------------------------------------------------

@dataclass(frozen=True)
class SwitchPrecision:
    """Train in `to` from the next checkpoint on, because of `cause`."""
    to: str
    cause: str


def precision_decision(current: str, overflows: list[int], scale: float | None, *, bf16_ok: bool,
                       window_steps: int, max_overflow_frac: float, min_scale: float) -> SwitchPrecision | None:
    """fp16 with loss scaling is unstable when more than `max_overflow_frac` of the last `window_steps` steps
    overflowed (`overflows`, oldest first, 1 or True where one did), or when the scale fell below `min_scale`: then the next safer
    precision is bf16 where the device has it (`bf16_ok`), else fp32. Other precisions never switch here."""
    if current != "fp16":
        return None
    safer = "bf16" if bf16_ok else "fp32"
    if scale is not None and scale < min_scale:
        return SwitchPrecision(safer, f"the fp16 loss scale fell to {scale:g}, below `train.amp.min_scale` "
                                      f"({min_scale:g})")
    recent = overflows[-window_steps:]
    if len(recent) == window_steps and sum(recent) > max_overflow_frac * window_steps:
        return SwitchPrecision(safer, f"{sum(recent)} of the last {window_steps} steps overflowed in fp16, more than "
                                      f"`train.amp.max_overflow_frac` ({max_overflow_frac:g})")
    return None


def rollback_precision_decision(current: str, rollbacks: int, max_rollbacks: int) -> SwitchPrecision | None:
    """bf16 is unstable for this run when `rollbacks` non-finite losses (rolled back and skipped so far)
    reach `max_rollbacks` (0: never): then fp32. fp16's non-finite steps are its scaler's overflows
    (`precision_decision`); fp32 has nothing safer."""
    if current != "bf16" or not max_rollbacks or rollbacks < max_rollbacks:
        return None
    return SwitchPrecision("fp32", f"{rollbacks} non-finite losses in bf16 were rolled back, "
                                   f"`train.amp.bf16_max_rollbacks` is {max_rollbacks}")


# ---- a failed attempt --------------------------------------------------------------------------

@dataclass(frozen=True)
class FailureCounts:
    """What a run has survived so far (`failure_decision` returns the next counts)."""
    failures: int = 0
    preemptions: int = 0
    same_error: int = 0
    """How many attempts in a row failed with `last_error`."""
    last_error: str = ""


@dataclass(frozen=True)
class Retry:
    """Start the worker group again, from the newest valid checkpoint."""
    counts: FailureCounts


@dataclass(frozen=True)
class GiveUp:
    """End the run with this message (a budget is spent)."""
    message: str


def failure_decision(counts: FailureCounts, preempted: bool, error: str, *, max_failures: int, max_preemptions: int,
                     max_same_error: int, final: bool = False, key: str | None = "") -> Retry | GiveUp:
    """After a failed attempt: preemptions (a SIGTERM, a drained node) count against `failure.max_preemptions`,
    everything else against `failure.max_failures` (-1: no limit); the same error in `failure.max_same_error`
    attempts in a row (0: no limit) gives up at once, since a retry would fail the same way. `final`: the
    error says a retry would fail alike (`OpenClawError.final`: a `ConfigError` a worker raised, a
    non-finite loss under `fail`), which no budget need wait out. `key`:
    what makes two errors the same (default: `error` itself; its ports and numbers left out, say); None:
    an error no retry need meet again (a lost node), which starts no run of the same error."""
    if final:
        return GiveUp(f"a retry would fail alike: {error}")
    if preempted:
        counts = FailureCounts(counts.failures, counts.preemptions + 1, 0, "")
        if 0 <= max_preemptions < counts.preemptions:
            return GiveUp(f"preempted {counts.preemptions} times, more than `failure.max_preemptions` "
                          f"({max_preemptions}); the latest: {error}")
        return Retry(counts)
    key = error if key == "" else key
    same = 0 if key is None else counts.same_error + 1 if key == counts.last_error else 1
    counts = FailureCounts(counts.failures + 1, counts.preemptions, same, key or "")
    if max_same_error and same >= max_same_error:
        return GiveUp(f"the same error in {same} attempts in a row (`failure.max_same_error` is {max_same_error}), "
                      f"so a retry would fail alike: {error}")
    if 0 <= max_failures < counts.failures:
        return GiveUp(f"failed {counts.failures} times, more than `failure.max_failures` ({max_failures}); "
                      f"the latest: {error}")
    return Retry(counts)
