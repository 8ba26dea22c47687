"""Ctrl-C on a sweep's driver (driver process): Tune's graceful stop, told in openclaw's words.

Tune answers a first Ctrl-C by saving its experiment state and ending the run, and then prints how to
resume it through its Python API. openclaw takes the Ctrl-C itself, hands it to Tune through the
SIGUSR1 that Tune answers the same way (`TUNE_DISABLE_SIGINT_HANDLER` keeps Tune's own handler out),
and lets the sweep end as interrupted: the parent run KILLED, the same command with `--resume` to go
on. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

TUNE_SHUTDOWN_LOGGER = "ray.tune.tune"
"""Tune's logger of an interrupted run's end: the Python way to resume it, the trials that did not
complete. openclaw says what to do instead (without --verbose)."""
TUNE_RESULTS_LOGGER = "ray.tune.analysis.experiment_analysis"
"""Warns of trials without result files (those an interrupt or a restore caught before their first
report), which openclaw does not read: its trials report to MLflow (without --verbose, errors only)."""


class Interrupt:
    """Whether a Ctrl-C asked the sweep to stop (then Tune ended it early, and it is resumable)."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def graceful_interrupt(verbose: bool) -> Iterator[Interrupt]:
    """Around `Tuner.fit()` in the main thread (elsewhere, nothing to do: no handler can be installed)."""
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    previous = signal.getsignal(signal.SIGINT)
    loggers = {name: logging.getLogger(name) for name in (TUNE_SHUTDOWN_LOGGER, TUNE_RESULTS_LOGGER)}
    levels = {name: log.level for name, log in loggers.items()}
    if not verbose:
        loggers[TUNE_RESULTS_LOGGER].setLevel(logging.ERROR)

    def on_sigint(signum, frame):
        tune_listens = callable(signal.getsignal(signal.SIGUSR1))  # Tune installs its handler as its run starts
        if interrupt.requested or not tune_listens:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        interrupt.requested = True
        print("openclaw: Ctrl-C: stopping the sweep; Tune saves its state first (press Ctrl-C again to stop at "
              "once)", file=sys.stderr, flush=True)
        if not verbose:
            loggers[TUNE_SHUTDOWN_LOGGER].setLevel(logging.CRITICAL)
        os.kill(os.getpid(), signal.SIGUSR1)

    signal.signal(signal.SIGINT, on_sigint)
    with contextlib.ExitStack() as stack:
        stack.callback(signal.signal, signal.SIGINT, previous)
        for name, level in levels.items():
            stack.callback(loggers[name].setLevel, level)
        yield interrupt
