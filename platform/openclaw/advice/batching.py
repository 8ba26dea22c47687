"""Batch arithmetic for the advice rules (pure): which micro-batch and global batch sizes a config can take,
and the LR that goes with a new global batch. A suggested value must pass the config's own checks
(`takes`): `train.global_batch_size` divisible by `train.micro_batch_size` x the data-parallel degree at
every world size the run may take, and the layout's own (a pipeline schedule's micro-batch count)."""
from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from openclaw.config_files import set_dotted


def refusal(config: Any, changes: dict[str, Any]) -> str | None:
    """Why the config would refuse `changes` (dotted keys), as its own validation says; None if it takes
    them. The advice suggests only values this returns None for."""
    raw = config.model_dump(by_alias=True)
    for key, value in changes.items():
        set_dotted(raw, key, value)
    try:
        type(config).model_validate(raw)
    except ValidationError as e:  # its first error's own sentence
        return e.errors()[0]["msg"].removeprefix("Value error, ")
    return None


def takes(config: Any, changes: dict[str, Any]) -> bool:
    return refusal(config, changes) is None


def dp_degrees(config: Any) -> list[int]:
    """The data-parallel degrees the batch sizes must divide for (as `Config._batch_divides` checks)."""
    s, mp = config.scaling, config.parallelism.model_parallel
    worlds = config.worlds if config.elastic.on_resize == "keep_global_batch" else [s.max_workers]
    return sorted({max(1, w // mp) for w in worlds})


def as_asked(config: Any, auto: bool) -> Any:
    """The config the advice reads on a worker: `train.micro_batch_size: auto` where `auto` resolved it
    (the worker's config holds the number). The rules that suggest a micro-batch are quiet under `auto`,
    which chooses the size itself: given the number, they contradicted the probe's choice."""
    if not auto:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"micro_batch_size": "auto"})})


def fixed_micro(config: Any) -> int | None:
    """`train.micro_batch_size` when it is a number (None: `auto`, which chooses it itself)."""
    m = config.train.micro_batch_size
    return m if isinstance(m, int) and not isinstance(m, bool) else None


def valid_micro(config: Any, micro: int) -> bool:
    g = config.train.global_batch_size
    return (micro > 0 and all(g % (micro * dp) == 0 for dp in dp_degrees(config))
            and takes(config, {"train.micro_batch_size": micro}))  # a pipeline schedule's count, too


def per_worker_batch(config: Any) -> int:
    """Samples per step on one data-parallel worker at the largest world size."""
    return config.train.global_batch_size // max(dp_degrees(config))


def accumulation(config: Any, world: int | None = None) -> int | None:
    """Micro-batches per step and worker at `world` (default: `scaling.max_workers`)."""
    micro = fixed_micro(config)
    if micro is None:
        return None
    dp = max(1, (world or config.scaling.max_workers) // config.parallelism.model_parallel)
    return max(1, config.train.global_batch_size // (micro * dp))


def larger_micro(config: Any, cap: float) -> int | None:
    """The largest valid micro-batch above today's and at most `cap` (and the per-worker batch), or None."""
    micro = fixed_micro(config)
    if micro is None:
        return None
    top = int(min(cap, per_worker_batch(config)))
    return next((m for m in range(top, micro, -1) if valid_micro(config, m)), None)


def smaller_micro(config: Any) -> int | None:
    """The largest valid micro-batch below today's, or None."""
    micro = fixed_micro(config)
    if micro is None:
        return None
    return next((m for m in range(micro - 1, 0, -1) if valid_micro(config, m)), None)


def batch_unit(config: Any) -> int:
    """Every valid `train.global_batch_size` is a multiple of this (with today's micro-batch)."""
    micro = fixed_micro(config) or 1
    return math.lcm(*(micro * dp for dp in dp_degrees(config)))


def global_batch_near(config: Any, target: float, tries: int = 64) -> int:
    """The valid global batch nearest `target` (at least one unit) that the config takes (a pipeline's
    `parallelism.microbatches` must divide it too), among the `tries` multiples of the unit nearest it."""
    unit = batch_unit(config)
    near = max(unit, int(round(target / unit)) * unit)
    candidates = sorted({max(unit, near + k * unit) for k in range(-tries, tries + 1)}, key=lambda g: (abs(g - target), g))
    return next((g for g in candidates if takes(config, {"train.global_batch_size": g})), near)


def scaled_lr(config: Any, new_global: int) -> float:
    """`train.optimizer.lr` for a global batch of `new_global`, by `elastic.lr_rule` (linear or sqrt)."""
    ratio = new_global / config.train.global_batch_size
    factor = ratio if config.elastic.lr_rule == "linear" else math.sqrt(ratio)
    return config.train.optimizer.lr * factor


def takes_auto_micro(config: Any) -> bool:
    """Whether this openclaw's config takes `train.micro_batch_size: auto` (chosen from the memory)."""
    try:
        type(config.train).model_validate({**config.train.model_dump(by_alias=True), "micro_batch_size": "auto"})
        return True
    except Exception:  # a ValidationError: the key takes numbers only
        return False
