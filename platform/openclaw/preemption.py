"""Graceful stops, seen by the training loop between steps (worker side).

Three things ask a run to stop, and each is answered with a checkpoint at the very next step, so a
graceful stop loses no step:

- `TERM`: SIGTERM to a training worker process (a node being drained, a spot reclaim, `kill`). The
  worker checkpoints and then fails on purpose, so Ray Train restarts the group from that checkpoint.
  A second SIGTERM exits at once, as Ray's own handler would.
- `NOTICE`: Ray Train's preemption notice (`ray.train.get_preemption_info`): a node of this group is
  about to go. The run checkpoints once and trains on; Ray restarts it when the node is gone.
- `STOP`: the driver was asked to stop (SIGTERM or Ctrl-C on `openclaw train`). The workers
  checkpoint and return; the same command resumes from that step.

Every rank must agree on the step at which to checkpoint, so each rank's flag is all-reduced (max)
once per step (with rank 0's "background checkpoint written" flag, see `openclaw.saver`). The reduction is started before the step's compute and read after it, so it overlaps
the step instead of adding a round trip to it.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("openclaw")

NONE, NOTICE, TERM, STOP = 0, 1, 2, 3

_ACTIVE = threading.Event()   # a training loop runs in this process
_TERMED = threading.Event()   # SIGTERM arrived while it ran
_INSTALLED = False


def _install_sigterm_handler(_actor: Any = None) -> bool:
    """Runs on the process's main thread (the only one allowed to set signal handlers)."""
    global _INSTALLED
    if _INSTALLED:
        return True
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if _ACTIVE.is_set() and not _TERMED.is_set():
            _TERMED.set()  # the loop checkpoints at its next step, then fails on purpose
            return
        if callable(previous):
            previous(signum, frame)
        else:
            sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    _INSTALLED = True
    return True


def install_in_ray_worker() -> bool:
    """Install the SIGTERM handler from a Ray Train worker's training thread.

    Ray Train runs the training function in a thread, and only the main thread may set signal
    handlers; the worker actor's own tasks run on its main thread, so the handler is installed
    through one (`__ray_call__`). Returns False when that is not possible (no actor, or a threaded one).
    """
    if threading.current_thread() is threading.main_thread():
        return _install_sigterm_handler()
    try:
        import ray
        actor = ray.get_runtime_context().current_actor
        return bool(ray.get(actor.__ray_call__.remote(_install_sigterm_handler), timeout=30))
    except Exception as e:  # SIGTERM then keeps Ray's default: the process exits, the last checkpoint stays
        log.warning("could not install the SIGTERM handler (%s); SIGTERM will stop without a checkpoint", e)
        return False


def _ray_preemption_notice() -> Any:
    """This worker's latest preemption notice from Ray Train's watcher, read locally (no collective)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context
        return get_train_context().preemption_context.preemption_info
    except Exception:
        return None


class StopSignals:
    """One per training loop: the local flag, the per-step agreement, and the driver's stop request."""

    def __init__(self, device: torch.device, stop_requested=None, poll_s: float = 0.5):
        """`stop_requested`: a callable that asks the driver (rank 0 only; polled in a thread)."""
        self.device = device
        self._driver_stop = threading.Event()
        self._notice_answered = False
        self._closed = threading.Event()
        _ACTIVE.set()
        if stop_requested is not None:
            threading.Thread(target=self._poll, args=(stop_requested, poll_s), daemon=True,
                             name="openclaw-stop-poll").start()
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _poll(self, stop_requested, poll_s: float) -> None:
        while not self._closed.wait(poll_s):
            try:
                if stop_requested():
                    self._driver_stop.set()
                    return
            except Exception:  # the driver is gone: Ray tears the group down by itself
                return

    def local(self) -> int:
        if self._driver_stop.is_set():
            return STOP
        if _TERMED.is_set():
            return TERM
        if not self._notice_answered and _ray_preemption_notice() is not None:
            return NOTICE
        return NONE

    def start(self, checkpoint_written: int = 0):
        """Begin agreeing on this step's flags (call before the step's compute). The vote also carries
        rank 0's "background checkpoint written" flag (`saver.Saver.ready`)."""
        flag = torch.tensor([self.local(), checkpoint_written], dtype=torch.int32)
        if not self._distributed:
            return flag, None
        flag = flag.to(self.device)
        return flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)

    def finish(self, pending) -> tuple[int, int]:
        """(stop flag, checkpoint written) as every rank agreed for this step (call after the compute)."""
        flag, work = pending
        if work is not None:
            work.wait()
        stop, written = flag.tolist()
        return stop, written

    def notice_answered(self) -> None:
        """The checkpoint for the current preemption notice is saved: do not save again for it."""
        self._notice_answered = True

    def close(self) -> None:
        self._closed.set()
        _ACTIVE.clear()
