"""Helpers the benchmarks share."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
STARTED = time.monotonic()
"""When this bench's process started (near enough: when it imported this module); `--budget-s` counts from it."""
BUDGET_LINE = "budget:"
"""How the line starts that `alternate` writes to stderr when its budget cut the rounds short (read by run_all)."""


def start_recipe(recipe: str, out: Path) -> Callable[[], Path]:
    """Start making `recipe`'s dataset under `out` (the real recipe, `data/prepare.py`, once); the returned
    function waits for it and returns `out`."""
    proc = None if (out / "stats.json").exists() else subprocess.Popen(
        [sys.executable, str(REPO / "data" / "prepare.py"), recipe, "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def done() -> Path:
        if proc is not None:
            err = proc.communicate()[1]
            if proc.returncode != 0:
                raise RuntimeError(f"preparing the {recipe} data failed: {err[-1500:]}")
        return out
    return done


def prepare_digits(out: Path) -> Path:
    """The digits dataset under `out` (made by the real recipe, once)."""
    return start_recipe("digits", out)()


ATTEMPTS = ("start", "resume", "restart", "resize")
"""The events.json kinds that mark a worker group starting (see openclaw.tracking.writer)."""


def run_events(uri: str, run_id: str) -> list[dict]:
    """A run's events, while it runs or after: its starts, restarts, resizes, checkpoints and failures."""
    import openclaw
    return openclaw.events(run_id, tracking_uri=uri)


def first_start_after(events: list[dict], t: float) -> dict | None:
    """The first worker-group start recorded after time `t` (a kill): training again from its step."""
    return next((e for e in events if e["t"] > t and e["event"] in ATTEMPTS), None)


EXIT_GRACE_S = 60.0
"""How long a side may take to exit after printing its result. torch's gloo teardown can deadlock at
exit (a DDP Reducer's process group joins its worker thread while holding the GIL that thread waits
for: seen once, in the FSDP anchor's DDP side, during a suite run); the figure was measured before."""


def run_side(argv: list[str], env: dict[str, str | None] | None = None, timeout_s: float = 900,
             exit_grace_s: float = EXIT_GRACE_S) -> dict:
    """One side of a bench in a fresh Python process (`env` adds variables; None removes one), in its own
    process group (a torchrun's ranks, a Ray anchor's daemons), all killed if it outlives `timeout_s`, or
    `exit_grace_s` after it printed its result. Its last JSON stdout line is its result: an anchor that
    prints its figure and then fails to shut Ray down cleanly, or hangs in its teardown, still counts."""
    import json
    import os
    import signal
    import threading
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    result_at: list[float] = []

    def read(stream, into: list[str], results: bool) -> None:
        for line in stream:
            into.append(line)
            if results and line.startswith("{"):
                result_at.append(time.monotonic())
    readers = [threading.Thread(target=read, args=(proc.stdout, out, True), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, err, False), daemon=True)]
    for t in readers:
        t.start()
    deadline, hung = time.monotonic() + timeout_s, False
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(argv, timeout_s, "".join(out), "".join(err))
            if result_at and time.monotonic() - result_at[-1] > exit_grace_s:
                hung = True
                break
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:  # timed out, hung in its teardown, or Ctrl-C: none of its processes outlives it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for t in readers:
            t.join(timeout=10)
    if hung:
        print(f"bench: {' '.join(argv[:3])} ... printed its result but had not exited {exit_grace_s:.0f} s later: "
              f"killed; its result counts", file=sys.stderr)
    lines = [x for x in "".join(out).strip().splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"{argv} exited {proc.returncode} with no JSON result:\n{''.join(err)[-3000:]}")
    return json.loads(lines[-1])


def own_train_workers() -> list:
    """The Ray Train workers of the Ray instance this process started (its descendants), not those of
    anything else running on the machine."""
    import psutil

    def cmdline(p) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:
            return ""
    return [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in cmdline(p)]


def first_step_after(events: list[dict], t: float, world_size: int | None = None) -> dict | None:
    """The first `first_step` event after time `t` (a kill), at `world_size` if given: the end of the
    first training step a restarted (or resized) worker group completed, where a recovery ends."""
    return next((e for e in events if e["t"] > t and e["event"] == "first_step"
                 and world_size in (None, e["world_size"])), None)


def add_budget(parser) -> None:
    """The `--budget-s` option every bench shares (`bench/run_all.py`'s quick mode passes it)."""
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds from this bench's start: begin no round that would end past it (at least one "
                             "round runs). Default: no budget, every --repeats round runs")


def alternate(sides: dict[str, Callable[[], dict]], repeats: int, budget_s: float | None = None,
              clock: Callable[[], float] = time.monotonic, started: float | None = None,
              warmup: bool = False) -> dict[str, list[dict]]:
    """Run every side `repeats` times, reversing the order on every other round (ABBA: A B, B A, A B, ...),
    so that a drift of the machine over the invocation weighs on each side alike. Returns each side's
    results in the order they ran. `warmup`: each side runs once first, its result dropped, so that the
    first timed run does not pay alone what only the first run of a process pays (a Ray worker pool, a
    database created).

    With `budget_s`, a round starts only if it would end within `budget_s` of `started` (the bench's
    start), taking the longest round so far as what the next one costs; the first round always runs,
    so every side has at least one result. Whole rounds only: each side keeps the same number of runs."""
    names, out = list(sides), {name: [] for name in sides}
    started = STARTED if started is None else started
    for name in names if warmup else []:
        print(f"  [warm-up] {name} (not counted) ...", file=sys.stderr, flush=True)
        sides[name]()
    longest = 0.0
    for i in range(repeats):
        now = clock()
        if i and budget_s is not None and now - started + longest > budget_s:
            print(f"{BUDGET_LINE} {i} of {repeats} rounds; one more (the longest took {longest:.0f} s) would end past "
                  f"the {budget_s:.0f} s budget ({now - started:.0f} s spent)", file=sys.stderr, flush=True)
            break
        for name in names if i % 2 == 0 else names[::-1]:
            print(f"  [{i + 1}/{repeats}] {name} ...", file=sys.stderr, flush=True)
            out[name].append(sides[name]())
        longest = max(longest, clock() - now)
    return out


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of one side's repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def figure(title: str, values: dict[str, list[float]], base: str, unit: str = "s", digits: int = 2) -> dict[str, Any]:
    """One figure of a bench: each side's median, spread (min-max), repeats and ratio of medians to `base`
    (None where the base's median is 0 or below: an overhead lost in the noise has no meaningful ratio)."""
    b = statistics.median(values[base])
    out: dict[str, Any] = {"figure": title, "unit": unit, "base": base, "sides": {}}
    for name, vals in values.items():
        s = spread(vals)
        out["sides"][name] = {**{k: round(v, digits) for k, v in s.items()},
                              "ratio": round(s["median"] / b, 3) if b > 0 else None}
    return out


def summarize(title: str, values: dict[str, list[float]], base: str, unit: str = "s",
              digits: int = 2) -> dict[str, Any]:
    """Print `figure(...)`: each side's median and spread, and its ratio of medians to `base`; return it
    (for the bench's JSON line, which `bench/run_all.py` gathers into `bench/results.md`)."""
    out = figure(title, values, base, unit, digits)
    print(title)
    for name, s in out["sides"].items():
        tail = "" if name == base else f"   ratio {name} / {base}: {s['ratio']}"
        print(f"  {name:<30} median {s['median']:.{digits}f} {unit} (min {s['min']:.{digits}f}, "
              f"max {s['max']:.{digits}f}, n={s['n']}){tail}")
    return out
