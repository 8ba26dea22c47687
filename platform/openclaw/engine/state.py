"""The one train state: everything that must survive a restart, behind state_dict()/load_state_dict()
(plain torch; worker process, saved in every checkpoint).

The data position is (epoch, offset) into the epoch's sample order (see `data.sampler`), and the RNG is
a function of the seed, the step and where each micro-batch starts in the global batch
(`micro_batch_seed`; a pipeline stage's also of the stage, `stage_seed`; of the data-parallel rank,
`seed_step`, for what a step draws outside its micro-batches' forwards); `num_samples` and
`shard_layout` let a resume check that it reads the same data.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from openclaw.errors import CheckpointError


def seed_step(seed: int, step: int, rank: int) -> None:
    """RNG (dropout, ...) as a function of (seed, step, rank): a resumed step draws what the original drew.
    `rank`: the data-parallel rank (tensor and pipeline peers compute one model's share of one batch)."""
    seed_all((seed * 1_000_003 + step) * 4099 + rank)


def micro_batch_seed(seed: int, step: int, start: int) -> int:
    """The RNG seed of the micro-batch that starts at sample `start` of step `step`'s global batch
    (`data.sampler.micro_batch_starts`): the same samples draw the same dropout at any world size, and
    whichever rank runs them (seeded by rank and step, a resize gave them other draws)."""
    return (((seed * 1_000_003 + step) << 32) + start) % 2**63  # one per (step, start) of a run


def later_seed(seed: int, by: int) -> int:
    """The seed of the micro-batch that starts `by` samples after the one `micro_batch_seed` gave `seed`
    (`micro_batch_seed(s, step, start + by)`): a pipeline's chunks of a rank's micro-batches."""
    return (seed + by) % 2**63


def stage_seed(seed: int, stage: int) -> int:
    """The seed of pipeline stage `stage`'s forward of the micro-batch seeded `seed`: each stage draws its
    own masks (seeded alike, two stages' dropout layers would drop the same positions)."""
    return (seed * 0x9E3779B97F4A7C15 + stage) % 2**63  # odd: one stage's seeds stay apart


def seed_all(value: int) -> None:
    """torch's generators, and Python's and numpy's global ones (a user's task or model may draw from them:
    they drew differently after every restart)."""
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


ATTEMPT_FIELDS = ("world_size", "attempt", "micro_batch_size", "micro_batch_key", "micro_batch_estimate_gb",
                  "compile_fell_back")
"""What describes the attempt that runs rather than the training so far: a rollback keeps them (and what
`resume_from` keeps)."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed. Global step `step` is the next one to run."""
    samples_seen: int = 0
    epoch: int = 0
    """The data position: the epoch of the next batch ..."""
    offset: int = 0
    """... and where in that epoch's sample order it starts."""
    world_size: int = 0
    """World size of the attempt that saved this state."""
    num_samples: int = 0
    """Training rows when saved; a resume over a different dataset is refused."""
    shard_layout: str = ""
    """What the sample order follows besides the row count (`data.sampler.order_layout`): under a shuffle
    window a digest of the shards' row counts, and a resume over the same rows cut otherwise is refused.
    Older checkpoints hold the digest whatever the window, or nothing."""
    seed: int = 0
    mlflow_run_id: str = ""
    attempt: int = 0
    """How many times the worker group has started on this run (1 on the first start)."""
    skipped_steps: list[int] = field(default_factory=list)
    """Global steps whose batch was skipped for a non-finite loss (`train.on_nonfinite_loss`)."""
    skipped_batches: list[list[int]] = field(default_factory=list)
    """Those batches' samples, [step, epoch, start, stop] in the epoch's sample order: a replay skips every
    batch that holds one of them. A step number alone would not do under `elastic.on_resize: scale_lr`,
    where the batch a step reads follows the world size. Older checkpoints lack it: their skipped steps
    are matched by step."""
    pending_metrics: list[dict[str, Any]] = field(default_factory=list)
    """Metrics logged since the last publish, with their timestamps; re-published idempotently on resume."""
    precision: str = ""
    """The precision the run trains in (fp32, bf16, fp16), as resolved on its hardware or switched to."""
    precision_switched_to: str = ""
    """Set by a run-time switch (`train.amp`): the precision every later attempt trains in."""
    overflow_steps: int = 0
    """fp16: steps whose scaled gradients overflowed (the update skipped, the scale lowered)."""
    overflow_window: list[int] = field(default_factory=list)
    """fp16: the newest `train.amp.window_steps` steps, 1 where one overflowed: the switch policy's window,
    so that a resumed run switches where the uninterrupted run does. Older checkpoints lack it: it
    starts empty."""
    loss_window: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """The training loss summed over the steps since the last logged `train/loss`, and their sample count
    (all ranks): a resume between two logged steps carries it on, so the next `train/loss` averages the
    same steps as an uninterrupted run would."""
    noise_window: list[float] = field(default_factory=list)
    """The gradient noise scale's pairs since the last log step, summed over the ranks: [|G|^2, S, count,
    measuring ranks] (`engine.noise.NoiseWindow`), carried on as `loss_window` is. Older checkpoints lack
    it: the window starts empty."""
    grad_noise_ema: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """The gradient noise scale's smoothed |G|^2 and S as of the last log step (`engine.noise`; the same
    on every rank), so that `train/grad_noise_scale_smooth` carries on across a restart. Older
    checkpoints lack it: it starts from zero."""
    compile_fell_back: str = ""
    """Why `train.compile` failed, where the run fell back to eager (`fallback: eager`): every later
    attempt trains eager too (compiled and eager steps differ in their last bits)."""
    micro_batch_size: int = 0
    """`train.micro_batch_size: auto`: the size chosen on the run's first start (0: the config sets it),
    kept by every later attempt (restart, resize, resume) whose `micro_batch_key` is the same. Older
    checkpoints lack it: the next start chooses."""
    micro_batch_key: str = ""
    """What that size was chosen for: model, precision, strategy, device type and memory."""
    micro_batch_estimate_gb: float = 0.0
    """The memory one worker was estimated to need at that size."""

    def advance(self, epoch: int, offset: int, global_batch_size: int) -> None:
        """One optimizer step done, on the global batch read at data position (epoch, offset)."""
        self.step, self.samples_seen = self.step + 1, self.samples_seen + global_batch_size
        self.epoch, self.offset = epoch, offset + global_batch_size

    def skips(self, step: int, epoch: int, start: int, stop: int) -> bool:
        """Whether the batch of samples [start, stop) of `epoch`, read at global step `step`, is skipped:
        it holds a sample of a skipped batch (or, from an older checkpoint, its step was skipped)."""
        if not self.skipped_steps:  # (every step asks: the usual run skipped nothing)
            return False
        kept = {b[0] for b in self.skipped_batches}
        return (any(e == epoch and s < stop and start < t for _, e, s, t in self.skipped_batches)
                or any(s == step for s in self.skipped_steps if s not in kept))

    def with_skipped(self, step: int, batch: tuple[int, int, int]) -> dict[str, Any]:
        """The skip lists with step `step`'s batch added, to load once a rollback has restored an older state."""
        return {"skipped_steps": sorted(set(self.skipped_steps) | {step}),
                "skipped_batches": [list(b) for b in sorted({tuple(b) for b in self.skipped_batches} | {(step, *batch)})]}

    def start_over(self) -> None:
        """Back to step 0 (a rollback before the first checkpoint)."""
        self.step, self.samples_seen, self.epoch, self.offset, self.pending_metrics = 0, 0, 0, 0, []
        self.loss_window = [0.0, 0.0]
        self.grad_noise_ema = [0.0, 0.0]
        self.noise_window = []
        self.overflow_window, self.overflow_steps = [], 0

    def resume_from(self, saved: dict[str, Any]) -> None:
        """Load a checkpoint's state as an attempt starts, keeping what this session has (where it has it):
        its MLflow run (a run deleted since was replaced by a new one, and the checkpoint's id sent every
        later checkpoint, and the exports made from them, to the deleted run) and its data's layout."""
        run_id, layout = self.mlflow_run_id, self.shard_layout
        self.load_state_dict(saved)
        self.mlflow_run_id, self.shard_layout = run_id or self.mlflow_run_id, layout or self.shard_layout

    def roll_back_to(self, saved: dict[str, Any]) -> None:
        """Load a checkpoint's state in the middle of an attempt (a rollback): its training, and this
        attempt's own description kept (`ATTEMPT_FIELDS`), which a checkpoint of an earlier attempt would
        set back (the next checkpoint and its events would name that attempt's world size)."""
        kept = {k: getattr(self, k) for k in ATTEMPT_FIELDS}
        self.resume_from(saved)
        self.load_state_dict(kept)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - set(asdict(self))
        if unknown:
            raise CheckpointError(f"train state has unknown fields {sorted(unknown)}: written by a newer openclaw?")
        for key, value in state.items():
            setattr(self, key, value)
