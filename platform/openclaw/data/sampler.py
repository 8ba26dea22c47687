"""The platform's sample order: pure functions of plain arguments, no Ray, no torch (worker process).

The order of an epoch is a permutation that depends only on (seed, epoch). The data position is
(epoch, offset): a global batch of ``G`` samples consumes positions ``[offset, offset + G)`` of its
epoch's permutation, whatever the world size; each worker takes one contiguous slice of that global
batch and splits it into micro-batches. A restart at any world size continues from the saved position
with exactly the next samples: nothing is dropped or repeated within an epoch.

A batch that would run past the end of the epoch starts the next epoch instead; the samples left over
are not seen in that epoch (they are in the next, since its permutation differs), which keeps every
optimizer step at exactly ``G``. With a fixed ``G`` the position is a function of the step
(`position_of`); with `elastic.on_resize: scale_lr` ``G`` changes with the world size (see
`runtime.policies.batch_plan`), and the saved position carries the run across.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from openclaw.errors import DataError


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    if num_samples < global_batch_size:
        raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch ({global_batch_size})")
    return num_samples // global_batch_size


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per worker per optimizer step: G = micro x accumulation x world."""
    per_worker, rest = divmod(global_batch_size, micro_batch_size * world_size)
    if rest or per_worker == 0:
        raise ValueError(f"global batch {global_batch_size} is not divisible by micro batch {micro_batch_size} "
                         f"x world size {world_size}")
    return per_worker


def epoch_order(seed: int, epoch: int, num_samples: int, shard_rows: Sequence[int] | None = None,
                window_shards: int = 0) -> np.ndarray:
    """A permutation of ``range(num_samples)`` that depends only on (seed, epoch, shard sizes, window).

    Sample ids number the rows of the shards in file order. With a window (fewer shards per window than
    shards), the epoch shuffles the shards, cuts them into windows of `window_shards`, and shuffles the
    samples within each window: a worker then needs only one window's shards (and the next) in memory.
    Without one, it is one permutation of the whole dataset.
    """
    if not shard_rows or window_shards <= 0 or len(shard_rows) <= window_shards:
        return np.random.default_rng([seed, epoch]).permutation(num_samples)
    starts = np.concatenate([[0], np.cumsum(shard_rows)])
    if starts[-1] != num_samples:
        raise ValueError(f"shard rows sum to {starts[-1]}, not {num_samples}")
    parts = []
    for k, ids in enumerate(shard_windows(seed, epoch, len(shard_rows), window_shards)):
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in ids])
        parts.append(rows[np.random.default_rng([seed, epoch, 2, k]).permutation(len(rows))])
    return np.concatenate(parts)


def shard_layout(shard_rows: Sequence[int]) -> str:
    """A digest of the training shards' row counts, in order: with a shuffle window, the sample order is a
    function of them (`epoch_order`), not of the row count alone."""
    return hashlib.sha1(np.asarray(list(shard_rows), dtype=np.int64).tobytes()).hexdigest()[:16]


def order_layout(shard_rows: Sequence[int], window_shards: int) -> str:
    """What the epoch's order follows besides the row count, kept in the train state: the shards' row counts
    (`shard_layout`) where a shuffle window cuts it, `unwindowed` where none does."""
    return f"windowed:{shard_layout(shard_rows)}" if 0 < window_shards < len(shard_rows) else "unwindowed"


def check_same_order(saved: dict[str, Any], num_samples: int, shard_rows: Sequence[int], window_shards: int,
                     path: str) -> None:
    """Refuse a checkpoint whose data position means other samples here: another row count, or (under a
    shuffle window then or now) the same rows cut into other shards, which reorders the rest of the epoch
    (the same number of rows prepared again in other shards resumed and trained on samples the epoch had
    seen). `saved["shard_layout"]` is `order_layout`'s; older checkpoints hold `shard_layout`'s digest
    whatever the window (refused, as then, only where a window cuts the order now), or nothing. The window
    is the checkpoint's (`launch.resume_check` keeps it): with none, no order followed the shards."""
    if saved["num_samples"] != num_samples:
        raise DataError(f"checkpoint {path} was trained on {saved['num_samples']} rows but `data.train` now has "
                        f"{num_samples}; use a new `name` to start a fresh run.")
    kept, now = saved.get("shard_layout"), order_layout(shard_rows, window_shards)
    older = kept != "unwindowed" and not str(kept).startswith("windowed:")
    if older and (now == "unwindowed" or kept == shard_layout(shard_rows)):
        return
    if kept and window_shards > 0 and kept != now:
        raise DataError(f"checkpoint {path} was trained on the same number of rows cut into other shards than "
                        f"`data.train` has now ({len(shard_rows)}); with `data.shuffle_window_shards` the sample "
                        f"order follows the shards, so the rest of its epoch would differ. Resume on the data it "
                        f"was trained on, or use a new `name`.")


def shard_windows(seed: int, epoch: int, num_shards: int, window_shards: int) -> list[np.ndarray]:
    """The epoch's shard order cut into windows: which shards each window draws its samples from."""
    if window_shards <= 0 or num_shards <= window_shards:
        return [np.arange(num_shards)]
    perm = np.random.default_rng([seed, epoch, 1]).permutation(num_shards)
    return [perm[i:i + window_shards] for i in range(0, num_shards, window_shards)]


def window_bounds(shard_rows: Sequence[int], windows: list[np.ndarray]) -> np.ndarray:
    """Epoch offsets where each window starts, and the epoch's end: ``[0, n0, n0 + n1, ..., N]``."""
    rows = np.asarray(shard_rows)
    return np.concatenate([[0], np.cumsum([rows[w].sum() for w in windows])])


def batch_start(epoch: int, offset: int, global_batch_size: int, num_samples: int) -> tuple[int, int]:
    """Where a batch of `global_batch_size` taken at data position (epoch, offset) starts."""
    if num_samples < global_batch_size:
        raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch ({global_batch_size})")
    return (epoch, offset) if offset + global_batch_size <= num_samples else (epoch + 1, 0)


@dataclass(frozen=True)
class StepPosition:
    """Where global step `step` reads: its epoch and its offset into that epoch's permutation."""
    step: int
    epoch: int
    offset: int


def position_of(step: int, num_samples: int, global_batch_size: int) -> StepPosition:
    spe = steps_per_epoch(num_samples, global_batch_size)
    epoch, within = divmod(step, spe)
    return StepPosition(step, epoch, within * global_batch_size)


def worker_slice(global_batch_size: int, world_size: int, rank: int) -> slice:
    """The contiguous part of a global batch that worker `rank` of `world_size` trains on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    per = global_batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


def micro_batch_starts(global_batch_size: int, world_size: int, rank: int, micro_batch_size: int) -> list[int]:
    """Where each of worker `rank`'s micro-batches starts in a global batch: what names a micro-batch
    whatever the world size (`engine.state.micro_batch_seed`)."""
    mine = worker_slice(global_batch_size, world_size, rank)
    return list(range(mine.start, mine.stop, micro_batch_size))


class Sampler:
    """Caches one epoch's permutation and hands out each step's sample positions for one worker."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, seed: int,
                 world_size: int = 1, rank: int = 0, shard_rows: Sequence[int] | None = None,
                 window_shards: int = 0):
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self.shard_rows, self.window_shards = list(shard_rows or []), window_shards
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation_steps(global_batch_size, micro_batch_size, world_size)
        self._slice = worker_slice(global_batch_size, world_size, rank)
        self.micro_starts = micro_batch_starts(global_batch_size, world_size, rank, micro_batch_size)
        """Where this worker's micro-batches start in each global batch."""
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)
        self._windows: tuple = (-1, [], np.empty(0))

    def order_layout(self) -> str:
        """What its epochs' order follows besides the row count (`order_layout`), for the train state."""
        return order_layout(self.shard_rows, self.window_shards)

    def global_batch(self, step: int) -> np.ndarray:
        """All positions global step `step` consumes, across all workers (a run with a fixed batch)."""
        pos = position_of(step, self.num_samples, self.global_batch_size)
        return self.global_batch_at(pos.epoch, pos.offset)[0]

    def global_batch_at(self, epoch: int, offset: int) -> tuple[np.ndarray, int, int]:
        """The next global batch from data position (epoch, offset): (positions, its epoch, its start)."""
        epoch, offset = batch_start(epoch, offset, self.global_batch_size, self.num_samples)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_order(self.seed, epoch, self.num_samples, self.shard_rows, self.window_shards)
        return self._order[offset:offset + self.global_batch_size], epoch, offset

    def next_window_shards(self, epoch: int, offset: int) -> np.ndarray:
        """The shards of the window after the one that position (epoch, offset) reads: what to prefetch."""
        return self.windows_at(epoch, offset)[1]

    def windows_at(self, epoch: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """The shards of the window that position (epoch, offset) reads, and of the one after it: what a
        worker keeps, and what it reads ahead (`ShardedData.prefetch`)."""
        if self._windows[0] != epoch:
            windows = shard_windows(self.seed, epoch, len(self.shard_rows), self.window_shards)
            self._windows = (epoch, windows, window_bounds(self.shard_rows, windows))
        _, windows, bounds = self._windows
        if len(windows) == 1:
            return windows[0], windows[0]
        k = int(np.searchsorted(bounds, offset, side="right")) - 1
        if k + 1 < len(windows):
            return windows[k], windows[k + 1]
        return windows[k], shard_windows(self.seed, epoch + 1, len(self.shard_rows), self.window_shards)[0]

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This worker's positions for `step`, split into `accumulation` micro-batches (fixed batch)."""
        return self.split(self.global_batch(step))

    def split(self, global_batch: np.ndarray) -> list[np.ndarray]:
        """This worker's slice of a global batch, as `accumulation` micro-batches."""
        mine = global_batch[self._slice]
        return [mine[i:i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]
