"""Graceful stops, seen by the training loop between steps (worker process).

Three things ask a run to stop, and each is answered with a checkpoint at the very next step, so a
graceful stop loses no step:

- `StopFlag.TERM`: SIGTERM to a training worker process (a node being drained, a spot reclaim, `kill`). The
  worker checkpoints and then fails on purpose, so Ray Train restarts the group from that checkpoint.
  A second SIGTERM exits at once, as Ray's own handler would.
- `StopFlag.CHECKPOINT`: Ray Train's preemption notice (`ray.train.get_preemption_info`: a node of this group
  is about to go), or the driver's request before a planned resize (a node joined, see
  `openclaw.launch.node_watcher`). The run checkpoints once and trains on; the restart that follows replays
  nothing.
- `StopFlag.STOP`: the driver was asked to stop (SIGTERM or Ctrl-C on `openclaw train`). The workers
  checkpoint and return; the same command resumes from that step.

Every rank must agree on the step at which to checkpoint, so each rank's flag is all-reduced (max)
once per step, with each rank's "background checkpoint still writing" flag (`openclaw.runtime.saver`).
The reduction is started before the step's compute and read after it, so it overlaps the step
instead of adding a round trip to it.
"""
from __future__ import annotations

import enum
import logging
import signal
import sys
import threading
from typing import Any

import ray
from ray.exceptions import RayActorError
import torch
import torch.distributed as dist

from openclaw.runtime.ray_private import get_train_context

log = logging.getLogger("openclaw")


class StopFlag(enum.IntEnum):
    """What a step's vote asks for. Ranks vote their local flag and the maximum wins, so a stop beats a
    SIGTERM, which beats a checkpoint request.

    Transitions, per training loop:
        NONE -> CHECKPOINT  a drain notice or a driver's checkpoint request arrives; after the checkpoint
                            is saved it is answered (`checkpoint_answered`) -> NONE, and training goes on
        NONE -> TERM        SIGTERM; after the checkpoint the worker fails on purpose, and Ray Train
                            restarts the group from that checkpoint (a new loop starts at NONE)
        NONE -> STOP        the driver asks to stop; after the checkpoint the loop returns (final)
    """
    NONE = 0
    CHECKPOINT = 1
    TERM = 2
    STOP = 3

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
        actor = ray.get_runtime_context().current_actor
        return bool(ray.get(actor.__ray_call__.remote(_install_sigterm_handler), timeout=30))
    except Exception as e:  # SIGTERM then keeps Ray's default: the process exits, the last checkpoint stays
        log.warning("could not install the SIGTERM handler (%s); SIGTERM will stop without a checkpoint", e)
        return False


def _ray_preemption_notice() -> Any:
    """This worker's latest preemption notice from Ray Train's watcher, read locally (no collective)."""
    try:
        return get_train_context().preemption_context.preemption_info
    except Exception:
        return None


def driver_control(control: Any) -> dict[str, Any]:
    """Rank 0 polls the driver's requests (stop, checkpoint before a resize) from the control plane: the
    `StopSignals` arguments that do so."""
    return {"control": lambda: ray.get(control.state.remote(), timeout=10),
            "on_request_answered": lambda request, step: control.checkpoint_answered.remote(request, step)}


class StopSignals:
    """One per training loop: the local flag, the per-step agreement, and the driver's stop request."""

    def __init__(self, device: torch.device, control=None, on_request_answered=None, poll_s: float = 0.5):
        """`control`: a callable that returns the driver's {"stop": reason or None, "checkpoint": request id}
        (rank 0 only; polled in a thread); `on_request_answered(request_id, step)` tells the driver."""
        self.device = device
        self._driver_stop = threading.Event()
        self._notice_answered = False
        self._request, self._answered_request = 0, 0
        self._on_request_answered = on_request_answered
        self._closed = threading.Event()
        _ACTIVE.set()
        if control is not None:
            # A request made before this attempt started is answered by the checkpoint it resumed from.
            self._request = self._answered_request = control().get("checkpoint", 0)
            if self._request and on_request_answered is not None:
                on_request_answered(self._request, None)
            threading.Thread(target=self._poll, args=(control, poll_s), daemon=True,
                             name="openclaw-control-poll").start()
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _poll(self, control, poll_s: float) -> None:
        while not self._closed.wait(poll_s):
            try:
                state = control()
            except RayActorError:  # the driver's control actor is gone: Ray tears the group down by itself
                return
            except Exception as e:  # a slow answer (a get that timed out on a loaded driver): ask again
                log.warning("could not read the driver's stop and checkpoint requests (%s); asking again", e)
                continue
            self._request = max(self._request, state.get("checkpoint", 0))
            if state.get("stop"):
                self._driver_stop.set()
                return

    def local(self) -> StopFlag:
        if self._driver_stop.is_set():
            return StopFlag.STOP
        if _TERMED.is_set():
            return StopFlag.TERM
        if self._request > self._answered_request:
            return StopFlag.CHECKPOINT
        if not self._notice_answered and _ray_preemption_notice() is not None:
            return StopFlag.CHECKPOINT
        return StopFlag.NONE

    def start(self, writing: int = 0):
        """Begin agreeing on this step's flags (call before the step's compute). The vote also carries
        this rank's "background checkpoint still writing" flag (`saver.Saver.writing`)."""
        flag = torch.tensor([self.local(), writing], dtype=torch.int32)
        if not self._distributed:
            return flag, None
        flag = flag.to(self.device)
        return flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)

    def finish(self, pending) -> tuple[StopFlag, bool]:
        """(stop flag, whether any rank is still writing a background checkpoint), as every rank agreed
        for this step (call after the compute)."""
        flag, work = pending
        if work is not None:
            work.wait()
        stop, writing = flag.tolist()
        return StopFlag(stop), bool(writing)

    def checkpoint_answered(self, step: int) -> str:
        """The checkpoint asked for (preemption notice or driver request) is saved at `step`: do not save
        again for it, and tell the driver. Returns what asked for it."""
        cause = "preemption notice"
        if _ray_preemption_notice() is not None:
            self._notice_answered = True
        if self._request > self._answered_request:
            self._answered_request, cause = self._request, "driver request"
            if self._on_request_answered is not None:
                self._on_request_answered(self._request, step)
        return cause

    def close(self) -> None:
        self._closed.set()
        _ACTIVE.clear()
