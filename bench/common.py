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
