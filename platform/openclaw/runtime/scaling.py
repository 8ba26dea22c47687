"""Ray Train's elastic scaling policy in whole layouts (built by the driver, run by Ray Train's controller).

Ray Train starts, restarts and resizes an elastic run's worker group to as many workers as the cluster
has resources for, any count from `min_workers` to `max_workers`. Under tensor or pipeline parallelism,
or hybrid sharding, only multiples of replicate x tensor x pipeline workers lay out as a mesh: with
tensor 2, 7 free GPUs must start 6 workers, not 7. This policy is Ray's with that count rounded down
(`mesh.whole_layouts`); everything else (when it looks, the resource requests, the minimum) is Ray's.
"""
from __future__ import annotations

from openclaw.engine.parallel.mesh import whole_layouts
from openclaw.runtime.ray_private import ElasticScalingPolicy


class WholeLayoutsPolicy(ElasticScalingPolicy):
    """Ray Train's elastic policy, its worker counts rounded down to multiples of `unit`."""

    def __init__(self, scaling_config, unit: int):
        super().__init__(scaling_config)
        self.unit = unit

    def _count_possible_workers(self, reserved_resources) -> int:
        return whole_layouts(super()._count_possible_workers(reserved_resources), self.unit)
