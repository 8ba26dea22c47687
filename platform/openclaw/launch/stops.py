"""The driver's stop requests (driver process): SIGTERM and Ctrl-C while a run trains.

The first asks the workers, through the run's control actor, to checkpoint at their next step and
return; a second stops at once. `launch.session` holds them around Ray Train's `fit()`.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class _Stops:
    """What the driver's signal handlers did: the first SIGTERM or Ctrl-C asks the workers to checkpoint at
    their next step and return (`cause` names it); a second one stops at once: SIGTERM as before, Ctrl-C
    by aborting Ray Train's run (`abort`) and raising KeyboardInterrupt."""

    def __init__(self, control):
        self.control, self.cause, self.abort = control, None, None

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

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, previous[signal.SIGTERM] if callable(previous[signal.SIGTERM]) else signal.SIG_DFL)
        stops.stop("SIGTERM", "send it again")

    def on_sigint(signum, frame):
        if stops.cause is None:
            stops.stop("Ctrl-C", "press Ctrl-C again")
            return
        signal.signal(signal.SIGINT, previous[signal.SIGINT])
        if stops.abort is not None:
            stops.abort()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stops
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
