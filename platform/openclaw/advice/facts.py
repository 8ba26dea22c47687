"""A run's `Facts`, from its log windows (pure; the driver and `openclaw advise` call it).

A window is the metrics of one log step (`perf/...` as `runtime.log_window` logs them). From a run's
metric history (MLflow) there is one per log step, and the first window of each attempt is left out:
it holds the attempt's start-up (the first shard reads, the first step's allocations). From the final
metrics Ray Train returns (tracking off) there is one, the last. Fractions are medians over the
windows, but the checkpoint share and the step time, which are ratios of sums: a checkpoint stalls
one window in `every_steps / log_every`, and a median would hide it.
"""
from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from openclaw.advice import batching
from openclaw.advice.measured import Facts

WINDOW_KEYS = ("perf/data_wait_frac", "perf/step_data_s", "perf/step_compute_s", "perf/step_checkpoint_s",
               "perf/step_net_compute_s", "perf/comm_frac", "perf/idle_frac", "perf/straggler_index", "perf/slowest_rank",
               "perf/samples_per_s", "perf/mfu", "perf/peak_memory_bytes", "perf/memory_capacity_bytes",
               "perf/param_bytes_per_rank", "perf/grad_bytes_per_rank", "perf/optimizer_bytes_per_rank", "perf/state_bytes_per_rank",
               "perf/peak_activation_bytes",
               "perf/graph_breaks", "perf/recompiles", "train/grad_noise_scale_smooth")
"""The metrics the facts are built from, besides each rank's split (`RANK_KEY`)."""
RANK_KEY = re.compile(r"perf/rank(\d+)/(data|compute|comm)_frac")
"""Each rank's shares of its wall time (`engine.metrics.rank_breakdown`)."""
CAPABILITY = re.compile(r"compute capability (\d+)\.(\d+)")


@dataclass
class RunNotes:
    """What a run says about itself beside its windows: its params, events, data preparation, wall time."""
    precision: str | None = None
    """`resolved/precision`."""
    precision_reason: str | None = None
    """`resolved/precision_reason`: names the device ("compute capability 8.0", "CPU")."""
    tf32: bool | None = None
    """From the `precision` event."""
    device_name: str | None = None
    attempt_starts: list[int] = field(default_factory=list)
    """The step each attempt started from (`resumed_from_step` of its attempt event)."""
    world_size: int | None = None
    accumulation: int | None = None
    prepare_s: float | None = None
    prepare_cache: str | None = None
    prepare_dir: str | None = None
    """The prepared-data cache's folder (absolute), as the run recorded it."""
    wall_s: float | None = None
    tensor_group_nodes: int | None = None
    """From the newest attempt event (recorded where `parallelism.tensor` > 1)."""
    workers_per_node: tuple[int, ...] | None = None
    model_blocks: int | None = None
    """From the newest attempt event (`blocks`)."""


def windows_from_history(history: dict[str, list[tuple[int, float]]]) -> list[dict[str, float]]:
    """`{key: [(step, value), ...]}` -> one window per logged step, in step order, each with its `step`."""
    by_step: dict[int, dict[str, float]] = {}
    for key, points in history.items():
        for step, value in points:
            by_step.setdefault(int(step), {})[key] = float(value)
    return [{"step": s, **by_step[s]} for s in sorted(by_step)]


def steady(windows: list[dict[str, float]], attempt_starts: list[int]) -> list[dict[str, float]]:
    """The windows less each attempt's first, each with its length in steps (`steps`); all of them where
    that leaves none (a run of one window)."""
    starts = sorted(attempt_starts)
    out, prev = [], None
    for w in windows:
        start = max((s for s in starts if s < w["step"]), default=None)
        first = start is not None and (prev is None or prev <= start)
        base = prev if prev is not None and (start is None or prev > start) else start
        out.append({**w, "steps": float(w["step"] - base) if base is not None else 1.0, "first": first})
        prev = w["step"]
    kept = [w for w in out if not w["first"]]
    return kept or out


def build_facts(config: Any, windows: list[dict[str, float]], notes: RunNotes | None = None) -> Facts:
    """Facts of `config`'s run from its `steady` windows and notes."""
    notes = notes or RunNotes()
    world = notes.world_size or config.scaling.max_workers
    accum = notes.accumulation or batching.accumulation(config, world)
    device, capability = _device(notes, windows)
    return Facts(
        config=config, data_wait_frac=_median(windows, "perf/data_wait_frac"),
        comm_frac=_median(windows, "perf/comm_frac"), checkpoint_frac=_checkpoint_frac(windows),
        idle_frac=_median(windows, "perf/idle_frac"), straggler_index=_median(windows, "perf/straggler_index"),
        slowest_rank=_most_common(windows, "perf/slowest_rank"), step_s=_step_s(windows),
        micro_batch_s=_micro_batch_s(windows, accum), samples_per_s=_median(windows, "perf/samples_per_s"),
        mfu=_median(windows, "perf/mfu"), device_type=device, device_name=notes.device_name,
        capability=capability, precision=notes.precision, tf32=notes.tf32,
        peak_memory_bytes=_max(windows, "perf/peak_memory_bytes"),
        memory_capacity_bytes=_last(windows, "perf/memory_capacity_bytes"),
        graph_breaks=_int(_max(windows, "perf/graph_breaks")), recompiles=_int(_max(windows, "perf/recompiles")),
        grad_noise_scale=_last(windows, "train/grad_noise_scale_smooth"), compute_frac=_compute_frac(windows),
        world_size=world, accumulation=accum, checkpoint_bytes=_checkpoint_bytes(windows),
        state_bytes=_max(windows, "perf/state_bytes_per_rank"), grad_bytes=_max(windows, "perf/grad_bytes_per_rank"),
        activation_bytes=_max(windows, "perf/peak_activation_bytes"),
        prepare_s=notes.prepare_s,
        prepare_cache=notes.prepare_cache, prepare_dir=notes.prepare_dir, wall_s=notes.wall_s, tensor_group_nodes=notes.tensor_group_nodes,
        workers_per_node=notes.workers_per_node, model_blocks=notes.model_blocks, rank_busy=_rank_busy(windows))


def facts_from_history(config: Any, history: dict[str, list[tuple[int, float]]], notes: RunNotes) -> Facts:
    """From a run's metric history (the first window of each attempt left out; of the first attempt
    at least, where no attempt event says more)."""
    return build_facts(config, steady(windows_from_history(history), notes.attempt_starts or [0]), notes)


def facts_from_metrics(config: Any, metrics: dict[str, Any], notes: RunNotes | None = None) -> Facts:
    """From one window: the final metrics Ray Train returns (rank 0's last logged window)."""
    window = {k: float(v) for k, v in metrics.items()
              if (k in WINDOW_KEYS or RANK_KEY.fullmatch(k)) and isinstance(v, (int, float))}
    return build_facts(config, [{**window, "step": float(metrics.get("step", 0)), "steps": 1.0}], notes)


# ---- per key ----------------------------------------------------------------------------------


def _values(windows: list[dict[str, float]], key: str) -> list[float]:
    return [w[key] for w in windows if key in w and not math.isnan(w[key])]


def _median(windows, key) -> float | None:
    values = _values(windows, key)
    return statistics.median(values) if values else None


def _max(windows, key) -> float | None:
    return max(_values(windows, key), default=None)


def _last(windows, key) -> float | None:
    values = _values(windows, key)
    return values[-1] if values else None


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _rank_busy(windows) -> tuple[float, ...] | None:
    """Per rank, the median over the windows of its data and compute shares (compute net of its wait),
    where its wait was measured (`comm_frac` logged): else compute holds the wait too."""
    ranks = sorted({int(m.group(1)) for w in windows for k in w if (m := RANK_KEY.fullmatch(k))})
    if not ranks or ranks != list(range(len(ranks))):
        return None
    busy = []
    for r in ranks:
        keys = [f"perf/rank{r}/{part}_frac" for part in ("data", "compute", "comm")]
        values = [w.get(keys[0], 0.0) + w[keys[1]] for w in windows
                  if keys[1] in w and keys[2] in w and not math.isnan(w[keys[2]])]
        if not values:
            return None
        busy.append(statistics.median(values))
    return tuple(busy)


def _most_common(windows, key) -> int | None:
    values = _values(windows, key)
    return int(Counter(values).most_common(1)[0][0]) if values else None


def _busy(w: dict[str, float]) -> float | None:
    parts = [w.get(k) for k in ("perf/step_data_s", "perf/step_compute_s", "perf/step_checkpoint_s")]
    return None if any(p is None for p in parts) else sum(parts)


def _timed(windows) -> list[dict[str, float]]:
    return [w for w in windows if _busy(w)]


def _checkpoint_frac(windows) -> float | None:
    timed = _timed(windows)
    total = sum(_busy(w) * w.get("steps", 1.0) for w in timed)
    return sum(w["perf/step_checkpoint_s"] * w.get("steps", 1.0) for w in timed) / total if total else None


def _step_s(windows) -> float | None:
    timed = _timed(windows)
    steps = sum(w.get("steps", 1.0) for w in timed)
    return sum(_busy(w) * w.get("steps", 1.0) for w in timed) / steps if steps else None


def _compute_frac(windows) -> float | None:
    values = [w["perf/step_compute_s"] / _busy(w) for w in _timed(windows)]
    return statistics.median(values) if values else None


def _micro_batch_s(windows, accumulation: int | None) -> float | None:
    """A micro-batch's compute: the median rank's compute per step, collective wait out, per micro-batch."""
    if not accumulation:
        return None
    values = [w["perf/step_net_compute_s"] / accumulation for w in windows if "perf/step_net_compute_s" in w]
    return statistics.median(values) if values else None


def _checkpoint_bytes(windows) -> float | None:
    params, optim = _max(windows, "perf/param_bytes_per_rank"), _max(windows, "perf/optimizer_bytes_per_rank")
    return None if params is None else params + (optim or 0.0)


def _device(notes: RunNotes, windows) -> tuple[str, tuple[int, int] | None]:
    """The device type and a GPU's compute capability, as the precision's reason names them."""
    match = CAPABILITY.search(notes.precision_reason or "")
    if match:
        return "cuda", (int(match.group(1)), int(match.group(2)))
    return ("cuda" if _values(windows, "perf/mfu") or notes.device_name else "cpu"), None
