"""The config sections the driver hands to Ray Train: `scaling` and `failure` (foundation: pydantic only)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from openclaw.section import Section


RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
"""Ray's built-in resource names, as `scaling.resources_per_worker` must spell them."""


class ScalingConfig(Section):
    min_workers: int = Field(1, gt=0)
    """The fewest training workers the run trains with; below `max_workers` the run is elastic: it shrinks
    on node loss (down to this) and grows back when resources return. With `parallelism.replicate`,
    `tensor` or `pipeline` above 1, both ends are multiples of their product, and so is every size the
    run takes between them."""
    max_workers: int = Field(1, gt=0)
    """The most training workers; with `min_workers` equal to it, the world size is fixed."""
    use_gpu: bool | Literal["auto"] = "auto"
    """auto: use GPUs when the cluster has any."""
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    """Ray resources each worker reserves, e.g. {CPU: 4, GPU: 1}; its CPUs also set its torch threads."""
    resize_monitor_interval_s: float = Field(10.0, gt=0)
    """Elastic runs (min < max): how often Ray Train looks for resources to grow into."""

    @model_validator(mode="after")
    def _range(self) -> "ScalingConfig":
        if self.min_workers > self.max_workers:
            raise ValueError(f"`scaling.min_workers` ({self.min_workers}) is larger than `scaling.max_workers` "
                             f"({self.max_workers})")
        for name, amount in self.resources_per_worker.items():
            standard = next((s for s in RAY_RESOURCES if s.lower() == name.lower()), name)
            if standard != name:  # Ray's names are case-sensitive: `cpu` is a custom resource no node has
                raise ValueError(f"`scaling.resources_per_worker.{name}`: Ray's resource is `{standard}` (its "
                                 f"names are case-sensitive; `{name}` is a custom resource no node has)")
            if amount < 0:
                raise ValueError(f"`scaling.resources_per_worker.{name}` must be 0 or more (got {amount:g})")
        return self


class FailureConfig(Section):
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts after failures before the run fails; -1 retries forever. Preemptions do not
    count here (see `max_preemptions`)."""
    max_preemptions: int = Field(-1, ge=-1)
    """Restarts after preemptions (a worker's SIGTERM, a node drained by the autoscaler or a spot
    reclaim) before the run fails; -1 (the default) retries forever: a preempted run checkpointed first."""
    max_same_error: int = Field(3, ge=0)
    """Give up once this many attempts in a row failed with the same error (a retry would fail the same
    way: a bug, a bad input), before `max_failures` is spent; 0 never gives up early."""
    worker_start_timeout_s: float = Field(30.0, gt=0)
    """How long Ray Train waits for a worker group to start before it retries at another size
    (Ray's default is 60 s, which it can spend waiting on a node that has died)."""
