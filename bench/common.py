"""Helpers the benchmarks share."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare_digits(out: Path) -> Path:
    """The digits dataset under `out` (made by the real recipe, once)."""
    if not (out / "stats.json").exists():
        subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "digits", "--out", str(out)],
                       check=True, capture_output=True)
    return out


ATTEMPTS = ("start", "resume", "restart", "resize")
"""The events.json kinds that mark a worker group starting (see openclaw.tracking.writer)."""


def run_events(uri: str, run_id: str) -> list[dict]:
    """A run's events, while it runs or after: its starts, restarts, resizes, checkpoints and failures."""
    import openclaw
    return openclaw.events(run_id, tracking_uri=uri)


def first_start_after(events: list[dict], t: float) -> dict | None:
    """The first worker-group start recorded after time `t` (a kill): training again from its step."""
    return next((e for e in events if e["t"] > t and e["event"] in ATTEMPTS), None)
