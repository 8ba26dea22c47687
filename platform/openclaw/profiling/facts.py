"""The advice rules' facts from a profile (pure: the profiled ranks' summaries and the run's config in,
`advice.rules.Facts` out; rank 0 after a profile).

The facts describe the run's average step, rebuilt from the profiled ones: a profile of a few steps
holds a checkpoint more often, or less often, than one every `checkpoint.every_steps`. So the profiled
checkpoint time is spread as one checkpoint every `every_steps` steps over the steps without it, and a
fraction is of that average step. When no checkpoint fell in the profiled steps, the checkpoint share is
unknown (None) and the step is the profiled steps' own. A fraction is the worst profiled rank's (the one
the others wait for); `straggler_index` is the busiest rank's busy time over the median rank's. What a
profile cannot tell (MFU, graph breaks, the gradient noise scale) stays None.
"""
from __future__ import annotations

import statistics
from typing import Any

from openclaw.advice.rules import Facts
from openclaw.profiling.summary import RankSummary


def saves_in(config: Any, first: int, last: int) -> int:
    """How many checkpoints the run writes after steps first..last (numbered from 1)."""
    every, end = config.checkpoint.every_steps, config.train.max_steps
    return sum(1 for s in range(first, last + 1) if s % every == 0 or s == end)


def average_step(s: RankSummary, saves: int, every: int) -> tuple[float, float | None]:
    """(seconds of the run's average step, of which checkpoint seconds or None) from one rank's summary
    of profiled steps that held `saves` checkpoints."""
    n, checkpoint = max(1, len(s.steps)), s.seconds.get("checkpoint", 0.0)
    if not saves:
        return s.wall_s / n, None
    per_step = checkpoint / saves / every
    return (s.wall_s - checkpoint) / n + per_step, per_step


def facts_from(summaries: list[RankSummary], config: Any, *, precision: str | None = None,
               tf32: bool | None = None, global_batch_size: int | None = None, world_size: int | None = None,
               model_blocks: int | None = None) -> Facts:
    """Facts for `advice.rules.advise`. `config` is the run's `Config`; `precision` and `tf32` are what
    the run trains in (the engine's decision); `global_batch_size` and `world_size` the attempt's;
    `model_blocks` the repeated blocks of rank 0's model (`Facts.model_blocks`)."""
    start = config.profile.start_step
    saves = saves_in(config, start + 1, start + (len(summaries[0].steps) if summaries else 0))
    steps = [average_step(s, saves, config.checkpoint.every_steps) for s in summaries]
    n = [max(1, len(s.steps)) for s in summaries]

    def worst(values: list) -> Any:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    def share(category: str) -> float | None:
        return worst([s.seconds.get(category, 0.0) / k / step for s, k, (step, _) in zip(summaries, n, steps)])

    busy = [s.busy_s for s in summaries]
    median = statistics.median(busy) if busy else 0.0
    slowest = max(range(len(busy)), key=busy.__getitem__) if busy else None
    step_s = worst([step for step, _ in steps])
    device = summaries[0].device if summaries else {"type": "cpu"}
    accumulation = _accumulation(config, global_batch_size, world_size)
    process = lambda key: worst([s.process.get(key) for s in summaries])  # noqa: E731
    return Facts(
        config=config, data_wait_frac=share("data"), comm_frac=share("communication"),
        checkpoint_frac=worst([c / step if c is not None else None for step, c in steps]),
        idle_frac=worst([s.idle_frac * s.wall_s / k / step for s, k, (step, _) in zip(summaries, n, steps)]),
        compute_frac=worst([(s.seconds.get("forward_backward", 0.0) + s.seconds.get("optimizer", 0.0)) / k / step
                            for s, k, (step, _) in zip(summaries, n, steps)]),
        straggler_index=busy[slowest] / median if slowest is not None and median > 0 else None,
        slowest_rank=summaries[slowest].rank if slowest is not None else None,
        micro_batch_s=worst([(s.seconds.get("forward_backward", 0.0) - _fb_communication(s)) / k
                             / accumulation for s, k in zip(summaries, n)]) if accumulation else None,
        accumulation=accumulation, step_s=step_s,
        samples_per_s=global_batch_size / step_s if global_batch_size and step_s else None,
        device_type=device.get("type", "cpu"), device_name=device.get("name"),
        capability=tuple(device["capability"]) if device.get("capability") else None,
        precision=precision, tf32=tf32, world_size=world_size, model_blocks=model_blocks,
        peak_memory_bytes=process("peak_memory_bytes"), memory_capacity_bytes=process("memory_capacity_bytes"),
        state_bytes=process("state_bytes"), checkpoint_bytes=process("checkpoint_bytes"),
        kernel_idle_frac=worst([s.kernel_idle_frac for s in summaries]),
        extra={"source": "profile", "profiled_ranks": [s.rank for s in summaries], "profiled_steps": min(n, default=0),
               "checkpoints_profiled": saves,
               "memory_by_category": summaries[0].memory.get("by_category") if summaries else None})


def _fb_communication(s: RankSummary) -> float:
    """The exposed communication inside the forward/backward (a summary from before it was kept: all of it)."""
    return s.seconds.get("communication_in_forward_backward", s.seconds.get("communication", 0.0))


def _accumulation(config: Any, global_batch_size: int | None, world_size: int | None) -> int | None:
    """Micro-batches per optimizer step and rank (the batch shared over the data-parallel ranks)."""
    micro = config.train.micro_batch_size
    if not (global_batch_size and world_size and isinstance(micro, int)):
        return None
    return max(1, global_batch_size // (micro * max(1, world_size // config.parallelism.model_parallel)))
