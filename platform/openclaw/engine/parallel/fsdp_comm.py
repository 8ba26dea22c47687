"""FSDP2's all-gathers and reduce-scatters, and HSDP's all-reduce, timed on CPUs (plain torch; worker
process).

FSDP2 takes custom collectives (`FSDPModule.set_custom_all_gather`, `set_custom_reduce_scatter`, public)
of types torch defines only in a private module, `torch.distributed.fsdp._fully_shard._fsdp_collectives`:
imported here alone. Each one here is torch's default collective, with a clock around the call. On a
CPU (gloo) FSDP calls them synchronously on the training thread, so their wall time is the step's
exposed communication (`CommClock.add`). HSDP's all-reduce over the replicas has no custom hook; it
runs right after the reduce-scatter, and FSDP then calls the public all-reduce hook
(`set_all_reduce_hook`), so the time from the reduce-scatter's end to that call is the all-reduce's.
On a GPU they are launched on FSDP's own streams and their wall time says nothing. There each
reduce-scatter marks its launch with a CUDA event on the compute stream (`mark_reduce_scatters`), and
the strategy marks the end of the backward, by when FSDP has made the compute stream wait for the last
reduce-scatter (and HSDP's all-reduce after it): the two events' gap is the gradient reduction the
backward did not hide, as DDP's is measured. The forward's all-gathers, which FSDP prefetches, are not
measured there. A torch without the private classes loses the measurement, not the run.
"""
from __future__ import annotations

import time

import torch
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


def measure_collectives(model: nn.Module, device: torch.device, replicated: bool = False) -> CommClock | None:
    """The clock of `model`'s FSDP collectives on `device`: on a CPU, every collective timed
    (`time_collectives`); on a GPU, the reductions' launches marked on the compute stream
    (`mark_reduce_scatters`). None where neither can be installed."""
    if device.type == "cuda":
        clock = CommClock(device, stream=torch.cuda.current_stream(device))
        return clock if mark_reduce_scatters(model, clock) else None
    clock = CommClock()
    return clock if time_collectives(model, clock, replicated) else None


def time_collectives(model: nn.Module, clock: CommClock, replicated: bool = False) -> bool:
    """Time every FSDP unit's all-gathers and reduce-scatters into `clock`, and with `replicated` (HSDP)
    its all-reduce over the replicas; False where it cannot."""
    units = _fsdp_units(model)
    if not units:
        return False
    for unit in units:
        unit.set_custom_all_gather(_timed(DefaultAllGather, clock))
        reduce_scatter = _timed(DefaultReduceScatter, clock)
        unit.set_custom_reduce_scatter(reduce_scatter)
        if replicated:
            unit.set_all_reduce_hook(_after_all_reduce(reduce_scatter, clock))
    return True


def mark_reduce_scatters(model: nn.Module, clock: CommClock) -> bool:
    """Mark the launch of every FSDP unit's reduce-scatter in `clock` (events on its stream: see the module
    docstring); False where it cannot."""
    units = _fsdp_units(model)
    if not units:
        return False
    for unit in units:
        unit.set_custom_reduce_scatter(_marked(DefaultReduceScatter, clock))
    return True


def _fsdp_units(model: nn.Module) -> list[FSDPModule]:
    """`model`'s FSDP units, none where this torch lacks the private collective classes."""
    if DefaultAllGather is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _marked(base: type, clock: CommClock):
    class Marked(base):
        def __call__(self, *args, **kwargs):
            clock.launched()
            return super().__call__(*args, **kwargs)
    return Marked()


def _after_all_reduce(reduce_scatter, clock: CommClock):
    def hook(reduced) -> None:  # FSDP's signature: the all-reduced gradients, left as they are
        clock.add(time.perf_counter() - reduce_scatter.ended)
    return hook
