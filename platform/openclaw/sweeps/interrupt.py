"""Ctrl-C or SIGTERM on a sweep's driver (driver process): Tune's graceful stop, told in openclaw's words.

Tune answers a first Ctrl-C by saving its experiment state and ending the run, and then prints how to
resume it through its Python API; a SIGTERM met Ray's handler, which aborts the driver. openclaw takes
both itself, hands them to Tune through the SIGUSR1 that Tune answers like a Ctrl-C
(`TUNE_DISABLE_SIGINT_HANDLER` keeps Tune's own handler out), and lets the sweep end as interrupted:
the parent run and the stopped trials KILLED, the same command with `--resume` to go on. A second
request stops at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from openclaw.launch.stops import put_back, stop_at_once
from openclaw.tracking.redact import scrub

TUNE_SHUTDOWN_LOGGER = "ray.tune.tune"
"""Tune's logger of an interrupted run's end: the Python way to resume it, the trials that did not
complete. openclaw says what to do instead (without --verbose)."""
TUNE_RESULTS_LOGGER = "ray.tune.analysis.experiment_analysis"
"""Warns of trials without result files (those an interrupt or a restore caught before their first
report), which openclaw does not read: its trials report to MLflow (without --verbose, errors only)."""


class Interrupt:
    """Whether a Ctrl-C or SIGTERM asked the sweep to stop (then Tune ended it early, and it is resumable)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        """The signal that asked: "SIGINT" (Ctrl-C) or "SIGTERM"."""

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def graceful_interrupt(verbose: bool, on_stop: Callable[[], None]) -> Iterator[Interrupt]:
    """Around `Tuner.fit()` in the main thread (elsewhere, nothing to do: no handler can be installed).

    At the first request, `on_stop` (which marks the sweep's MLflow runs KILLED) runs at once, before
    Tune's stop: a SIGTERM often comes from something that kills soon after (`ray job stop` waits 3 s).
    It runs in a thread: the main thread may hold a tracking store's lock when the signal comes."""
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    loggers = {name: logging.getLogger(name) for name in (TUNE_SHUTDOWN_LOGGER, TUNE_RESULTS_LOGGER)}
    levels = {name: log.level for name, log in loggers.items()}
    if not verbose:
        loggers[TUNE_RESULTS_LOGGER].setLevel(logging.ERROR)

    def on_signal(signum, frame):
        tune_listens = callable(signal.getsignal(signal.SIGUSR1))  # Tune installs its handler as its run starts
        if interrupt.requested or not tune_listens:
            put_back(previous)
            stop_at_once(signum)
        interrupt.signal_name = signal.Signals(signum).name
        said, again = ("Ctrl-C", "press Ctrl-C again") if signum == signal.SIGINT else ("SIGTERM", "send it again")
        print(f"openclaw: {said}: stopping the sweep; Tune saves its state first ({again} to stop at once)",
              file=sys.stderr, flush=True)
        if not verbose:
            loggers[TUNE_SHUTDOWN_LOGGER].setLevel(logging.CRITICAL)
        threading.Thread(target=_mark_then_stop_tune, args=(on_stop,), name="openclaw-sweep-stop", daemon=True).start()

    for sig in previous:
        signal.signal(sig, on_signal)
    with contextlib.ExitStack() as stack:
        stack.callback(put_back, previous)
        for name, level in levels.items():
            stack.callback(loggers[name].setLevel, level)
        yield interrupt


MARK_TIMEOUT_S = 5.0
"""How long Tune's stop waits for the runs to be marked KILLED (a tracking server that does not answer)."""


def _mark_then_stop_tune(on_stop: Callable[[], None]) -> None:
    """Mark the runs (at most `MARK_TIMEOUT_S`), then hand the stop to Tune (SIGUSR1, which Tune's handler
    answers in the main thread). In this order, a kill soon after the signal finds the runs marked and
    Tune not yet writing its stopped state, which a kill in the middle of would leave incomplete."""
    marker = threading.Thread(target=_mark_stopped, args=(on_stop,), name="openclaw-sweep-mark", daemon=True)
    marker.start()
    marker.join(MARK_TIMEOUT_S)
    os.kill(os.getpid(), signal.SIGUSR1)


def _mark_stopped(on_stop: Callable[[], None]) -> None:
    try:
        on_stop()
    except Exception as e:  # the tracking server is away: the sweep's end tries again
        print(f"openclaw: could not mark the sweep's MLflow runs KILLED yet ({scrub(e)})", file=sys.stderr, flush=True)
        return
    print("openclaw: the sweep's MLflow runs are marked KILLED (`--resume` reopens them)", file=sys.stderr, flush=True)
