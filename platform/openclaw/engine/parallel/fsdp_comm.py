"""FSDP2's all-gathers and reduce-scatters, and HSDP's all-reduce, timed on CPUs (plain torch; worker
process).

FSDP2 takes custom collectives (`FSDPModule.set_custom_all_gather`, `set_custom_reduce_scatter`, public)
of types torch defines only in a private module, `torch.distributed.fsdp._fully_shard._fsdp_collectives`:
imported here alone. Each one here is torch's default collective, with a clock around the call. On a
CPU (gloo) FSDP calls them synchronously on the training thread, so their wall time is the step's
exposed communication (`CommClock.add`). HSDP's all-reduce over the replicas has no custom hook; it
runs right after the reduce-scatter, and FSDP then calls the public all-reduce hook
(`set_all_reduce_hook`), so the time from the reduce-scatter's end to that call is the all-reduce's.
On a GPU they are launched on FSDP's own streams and their wall time says nothing: not installed there
(the strategy reports no measurement). A torch without the private classes loses the measurement, not
the run.
"""
from __future__ import annotations

import time

from torch import nn
from torch.distributed.fsdp import FSDPModule

from openclaw.engine.parallel.base import CommClock

try:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
except ImportError:  # renamed in a later torch
    DefaultAllGather = DefaultReduceScatter = None


def _timed(base: type, clock: CommClock):
    class Timed(base):
        ended = 0.0
        """When the last call returned (`time.perf_counter`)."""

        def __call__(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().__call__(*args, **kwargs)
            finally:
                self.ended = time.perf_counter()
                clock.add(self.ended - t0)
    return Timed()


def time_collectives(model: nn.Module, clock: CommClock, replicated: bool = False) -> bool:
    """Time every FSDP unit's all-gathers and reduce-scatters into `clock`, and with `replicated` (HSDP)
    its all-reduce over the replicas; False where it cannot."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if DefaultAllGather is None or not units:
        return False
    for unit in units:
        unit.set_custom_all_gather(_timed(DefaultAllGather, clock))
        reduce_scatter = _timed(DefaultReduceScatter, clock)
        unit.set_custom_reduce_scatter(reduce_scatter)
        if replicated:
            unit.set_all_reduce_hook(_after_all_reduce(reduce_scatter, clock))
    return True


def _after_all_reduce(reduce_scatter, clock: CommClock):
    def hook(reduced) -> None:  # FSDP's signature: the all-reduced gradients, left as they are
        clock.add(time.perf_counter() - reduce_scatter.ended)
    return hook
