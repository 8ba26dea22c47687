"""A stop at once whose clean-up cannot end (`launch.stops.exit_when_stuck`), in a real process with a
real signal: no Ray, no mocks."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import REPO

STUCK = textwrap.dedent("""
    import subprocess, sys, threading
    from openclaw.launch.stops import allow_clean_up, exit_when_stuck, stop_signals_raise
    if sys.argv[1] != "sdk":
        exit_when_stuck(1.0, "Run it with --resume." if sys.argv[1] == "flush" else None)
    stop_signals_raise()
    child = subprocess.Popen(["sleep", "600"])  # as the driver's local Ray instance
    held = threading.Lock()
    try:
        print(child.pid, flush=True)  # inside the try: the test signals once it reads this
        threading.Event().wait()
    except KeyboardInterrupt:  # the clean-up waits on a lock the main thread held when the signal came
        if sys.argv[1] == "flush":  # after announcing a bounded wait of its own, as a tracking flush
            allow_clean_up(3.0)
        held.acquire()
        held.acquire()
""")


def _ended(pid: int) -> bool:
    """Whether the process ends within 10 s (a SIGKILL lands when the process next runs: on a loaded
    machine, after the command that sent it has exited)."""
    try:
        gone, alive = psutil.wait_procs([psutil.Process(pid)], timeout=10)
    except psutil.NoSuchProcess:
        return True
    return not alive or alive[0].status() == psutil.STATUS_ZOMBIE


def _start(mode: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    proc = subprocess.Popen([sys.executable, "-c", STUCK, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    return proc, int(proc.stdout.readline())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_at_once_whose_clean_up_hangs_still_ends_the_command_and_what_it_started(sig):
    proc, child = _start("cli")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert f"stopped at once by {name}, but its clean-up did not end within 1 s beyond" in err, err
    assert "Run the same command again to go on" in err and "held.acquire()" not in err
    assert '<string>", line 16' in err, err  # where the main thread stood: the second acquire
    assert _ended(child)


def test_a_bounded_wait_of_the_clean_up_own_is_waited_for():
    """A tracking flush spools what it could not deliver when its timeout ends: a stop at once waits for
    that (3 s here) and the grace (1 s) after it, so nothing the flush would keep is lost. It says how to
    go on as its command does (a sweep: with --resume)."""
    proc, child = _start("flush")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "did not end within 1 s beyond its own bounded waits" in err, err
    assert "exiting without it. Run it with --resume. Where its threads stood" in err  # as the command says
    assert time.monotonic() - t0 >= 4.0


def test_an_sdk_callers_interpreter_is_not_ended_for_it():
    proc, child = _start("sdk")
    try:
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # three times the command line's grace: still there, as the caller left it
        assert psutil.Process(child).status() != psutil.STATUS_ZOMBIE
    finally:
        proc.kill()
        os.kill(child, signal.SIGKILL)
        proc.communicate()


def test_rank_0_keeps_polling_the_driver_after_an_answer_that_did_not_come():
    """One poll that timed out (a loaded driver) ended rank 0's poll thread for the rest of the attempt:
    a SIGTERM or Ctrl-C to the driver afterwards never reached the workers, and a node's join never got its
    checkpoint."""
    import threading
    import time

    import torch

    from openclaw.runtime.stops import StopFlag, StopSignals
    calls, stopped = [], threading.Event()

    def control():
        calls.append(1)
        if len(calls) == 2:  # the first poll after the attempt's start
            raise TimeoutError("Get timed out: some object(s) not ready.")
        if len(calls) >= 3:
            stopped.set()
            return {"stop": "SIGTERM", "checkpoint": 5}
        return {"stop": None, "checkpoint": 0}
    signals = StopSignals(torch.device("cpu"), control=control, poll_s=0.01)
    try:
        assert stopped.wait(30), f"the poll stopped after {len(calls)} call(s)"
        deadline = time.monotonic() + 30
        while signals.local() is not StopFlag.STOP and time.monotonic() < deadline:
            stopped.wait(0.01)  # the thread sets the flag just after control() returns
        assert signals.local() is StopFlag.STOP
    finally:
        signals.close()


def test_a_sigterm_at_the_last_step_ends_the_run_it_finished_not_a_restart():
    """A TERM voted at `train.max_steps` saved the final checkpoint, then raised WorkerPreempted: Ray
    restarted the group to run no step (and waited for resources where its node was gone, or failed the
    finished run under `max_preemptions: 0`)."""
    from types import SimpleNamespace

    import pytest

    from openclaw.errors import WorkerPreempted
    from openclaw.runtime.attempt import Attempt
    from openclaw.runtime.stops import StopFlag
    events = []
    tracker = SimpleNamespace(event=lambda kind, **fields: events.append(kind), progress=lambda line: None)
    attempt = SimpleNamespace(state=SimpleNamespace(step=100), tracker=tracker, close=lambda: events.append("closed"),
                              config=SimpleNamespace(train=SimpleNamespace(max_steps=100)))
    assert Attempt.answer_stop(attempt, StopFlag.TERM) is True and events == []  # the loop ends, the run finishes
    attempt.state.step = 60
    with pytest.raises(WorkerPreempted, match="checkpointed at step 60"):
        Attempt.answer_stop(attempt, StopFlag.TERM)
    assert events == ["preempted", "closed"]
