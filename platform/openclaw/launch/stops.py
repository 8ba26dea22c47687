"""The driver's stop requests (driver process): SIGTERM and Ctrl-C while a run is open.

While it trains, the first asks the workers, through the run's control actor, to checkpoint at their
next step and return; a second stops at once. Before training starts, either stops at once. Stopping at
once raises KeyboardInterrupt (`Terminated` for SIGTERM), so that the run is closed on the way out.
`launch.session` holds them around the run and around Ray Train's `fit()`.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from openclaw.errors import Terminated


class _Stops:
    """What the driver's signal handlers did: the first SIGTERM or Ctrl-C asks the workers to checkpoint at
    their next step and return (`cause` names it); a second one stops at once, aborting Ray Train's run
    (`abort`) and raising KeyboardInterrupt (`Terminated` for SIGTERM), so that the run is closed KILLED."""

    def __init__(self, control):
        self.control, self.cause, self.abort = control, None, None
        self.at_once: int | None = None
        """The signal that asked to stop at once, if one did."""

    def stop(self, cause: str, again: str) -> None:
        self.cause = cause
        self.control.request_stop.remote(cause)
        print(f"openclaw: {cause}: checkpointing at the next step, then stopping ({again} to stop at once)",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def graceful_stops(control) -> Iterator[_Stops]:
    """While training, in the main thread: graceful SIGTERM and Ctrl-C (`_Stops`). Ray Train's own Ctrl-C
    handler, which aborts the run at once, is left out (`OpenclawTorchTrainer`)."""
    stops = _Stops(control)
    if threading.current_thread() is not threading.main_thread():
        yield stops
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    said = {signal.SIGTERM: ("SIGTERM", "send it again", Terminated),
            signal.SIGINT: ("Ctrl-C", "press Ctrl-C again", KeyboardInterrupt)}

    def on_signal(signum, frame):
        cause, again, error = said[signum]
        if stops.cause is None:
            stops.stop(cause, again)
            return
        put_back(previous)
        stops.at_once = signum
        if stops.abort is not None:
            stops.abort()
        raise error

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield stops
    finally:
        put_back(previous)


def sigterm_raises() -> dict[int, Any]:
    """In the main thread, SIGTERM raises `Terminated` (a KeyboardInterrupt, as Ctrl-C does) while the run
    is open, so that the MLflow run is closed KILLED and Ray shut down on the way out. Ray's core worker
    would otherwise dump a stack and abort the driver (exit 134) wherever a SIGTERM finds it before
    training starts (`launch.ray_setup.connect_ray` keeps this handler in place of Ray's). Returns the
    handler it replaced, for `put_back` (empty where no handler can be installed)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_sigterm(signum, frame):
        raise Terminated
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}


def put_back(handlers: dict[int, Any]) -> None:
    """Reinstall the signal handlers `signal.getsignal` or `signal.signal` returned (None, a handler
    installed outside Python, as the default one)."""
    for sig, handler in handlers.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
