"""The driver's stop requests (driver process): SIGTERM and Ctrl-C while a run is open.

While it trains, the first asks the workers, through the run's control actor, to checkpoint at their
next step and return; a second stops at once. Before training starts, either stops at once. Stopping at
once raises KeyboardInterrupt (`Terminated` for SIGTERM), so that the run is closed on the way out.
`launch.session` holds them around the run and around Ray Train's `fit()`.

The command line also bounds that way out (`exit_when_stuck`): a signal raised into the main thread can
find it holding a lock its clean-up needs again, and a main thread blocked on it runs no further
handler, so no second signal could end it either.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import psutil

from openclaw.errors import Terminated


class _Grace:
    """The command line's bound on a stop at once (`exit_when_stuck`): a deadline, pushed back by the
    clean-up's own bounded waits (`allow`), and a daemon thread that ends the process when it passes."""

    def __init__(self):
        self.seconds: float | None = None
        """`exit_when_stuck`'s grace; None: never end the process (an SDK caller's interpreter)."""
        self.deadline: float | None = None
        self.signum = 0
        self.resume = "Run the same command again to go on."
        """How to go on, as the command says it."""

    def start(self, signum: int) -> None:
        if self.seconds is None or self.deadline is not None:
            return
        self.signum, self.deadline = signum, time.monotonic() + self.seconds
        threading.Thread(target=self._exit_when_passed, name="openclaw-stop-grace", daemon=True).start()

    def allow(self, seconds: float) -> None:
        if self.deadline is not None:
            self.deadline = max(self.deadline, time.monotonic() + seconds + self.seconds)

    def _exit_when_passed(self) -> None:
        while (left := self.deadline - time.monotonic()) > 0:  # a clean-up that ends in time ends this thread
            threading.Event().wait(left)
        name = "SIGTERM" if self.signum == signal.SIGTERM else "Ctrl-C"
        print(f"openclaw: stopped at once by {name}, but its clean-up did not end within {self.seconds:g} s "
              f"beyond its own bounded waits ($OPENCLAW_STOP_GRACE_S); exiting without it. {self.resume} Where "
              f"its threads stood:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        sys.stderr.flush()
        os._exit(128 + self.signum)


_GRACE = _Grace()


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
    said = {signal.SIGTERM: ("SIGTERM", "send it again"), signal.SIGINT: ("Ctrl-C", "press Ctrl-C again")}

    def on_signal(signum, frame):
        cause, again = said[signum]
        if stops.cause is None:
            stops.stop(cause, again)
            return
        put_back(previous)
        stops.at_once = signum
        _GRACE.start(signum)  # before Ray Train's abort, which may itself not return
        if stops.abort is not None:
            stops.abort()
        stop_at_once(signum)

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield stops
    finally:
        put_back(previous)


def stop_signals_raise() -> dict[int, Any]:
    """In the main thread, SIGTERM raises `Terminated` (a KeyboardInterrupt) and Ctrl-C KeyboardInterrupt
    while the run is open (`stop_at_once`), so that the MLflow run is closed KILLED and Ray shut down on
    the way out. Ray's core worker would otherwise dump a stack and abort the driver (exit 134) wherever
    a SIGTERM finds it before training starts (`launch.ray_setup.connect_ray` keeps this handler in place
    of Ray's). Returns the handlers it replaced, for `put_back` (empty where none can be installed)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame):
        stop_at_once(signum)
    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


def stop_at_once(signum: int) -> NoReturn:
    """Raise KeyboardInterrupt (`Terminated` for SIGTERM) into the main thread, the run's clean-up on its
    way out; under `exit_when_stuck`, first start the clock on that clean-up."""
    _GRACE.start(signum)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def exit_when_stuck(grace_s: float, resume: str | None = None) -> None:
    """For a process that ends with its command (the command line, a job's driver): a stop at once whose
    clean-up has not ended within `grace_s` ends the process anyway, with the processes it started (its
    local Ray instance), saying so, how to go on (`resume`) and where its threads stood. An SDK caller's
    interpreter is left alone."""
    _GRACE.seconds = grace_s
    _GRACE.resume = resume or _GRACE.resume


def allow_clean_up(seconds: float) -> None:
    """A wait of the clean-up's own, bounded by `seconds` (the tracking flush's timeout, after which it
    spools what is left): a stop at once under way gets that long more, so nothing it would keep is lost."""
    _GRACE.allow(seconds)


def put_back(handlers: dict[int, Any]) -> None:
    """Reinstall the signal handlers `signal.getsignal` or `signal.signal` returned (None, a handler
    installed outside Python, as the default one)."""
    for sig, handler in handlers.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
