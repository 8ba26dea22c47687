"""The platform's sample order: pure functions of plain arguments, no Ray, no torch.

The order of an epoch is a permutation that depends only on (seed, epoch). Global step ``s`` consumes
the fixed positions ``[o, o + G)`` of its epoch's permutation (``G`` the global batch size), whatever
the world size; each worker takes one contiguous slice of that global batch and splits it into
micro-batches. So the data position is the step itself, and a restart at any world size continues
with exactly the next samples: nothing is dropped or repeated within an epoch.

Each epoch holds ``n // G`` steps; the ``n % G`` samples left over are not seen in that epoch (they
are in the next, since its permutation differs), which keeps every optimizer step at exactly ``G``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """A permutation of ``range(num_samples)`` that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


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


class Sampler:
    """Caches one epoch's permutation and hands out each step's sample positions for one worker."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, seed: int,
                 world_size: int = 1, rank: int = 0):
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation_steps(global_batch_size, micro_batch_size, world_size)
        self._slice = worker_slice(global_batch_size, world_size, rank)
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def global_batch(self, step: int) -> np.ndarray:
        """All positions global step `step` consumes, across all workers."""
        pos = position_of(step, self.num_samples, self.global_batch_size)
        if pos.epoch != self._epoch:
            self._epoch, self._order = pos.epoch, epoch_order(self.seed, pos.epoch, self.num_samples)
        return self._order[pos.offset:pos.offset + self.global_batch_size]

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This worker's positions for `step`, split into `accumulation` micro-batches."""
        mine = self.global_batch(step)[self._slice]
        return [mine[i:i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]
