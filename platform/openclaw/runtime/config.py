"""The config sections of what runs inside Ray Train: `elastic` (resize policy) and `checkpoint`
(foundation: pydantic only)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from openclaw.section import Section


class ElasticConfig(Section):
    on_resize: Literal["keep_global_batch", "scale_lr"] = "keep_global_batch"
    """What a change of world size does to the optimization. `keep_global_batch`: the global batch and
    the LR schedule stay as configured and gradient accumulation absorbs the change, so a resized run
    follows the same optimization path. `scale_lr`: each worker keeps the batch it has at
    `scaling.max_workers` (`train.global_batch_size / max_workers`), so the global batch shrinks and
    grows with the world, and the LR is scaled by `lr_rule`."""
    lr_rule: Literal["linear", "sqrt"] = "linear"
    """With `scale_lr`: the LR is multiplied by `world / max_workers` (linear) or its square root (sqrt)."""


class CheckpointConfig(Section):
    every_steps: int = Field(50, gt=0)
    """Save every N steps, and always at the end."""
    keep: int = Field(3, gt=0)
    """How many checkpoints to keep."""
    storage: str = "runs"
    """A local folder (made absolute) or a URI such as s3://bucket/prefix. The run's checkpoints, job
    file and sample ledger live in `<storage>/<name>/`."""
    async_: bool = Field(False, alias="async")
    """`async: true`: snapshot the state to host memory and write the checkpoint in the background, so
    training stalls only for the snapshot. The final checkpoint and a stop's are always written at once.
    The writing thread needs a CPU the steps leave free (GPU workers; CPU workers with
    `train.threads_per_worker` below their CPUs): else it slows the steps about as much as it saves."""
