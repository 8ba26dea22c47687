"""The driver's progress lines: pure formatting of what rank 0 reports (driver)."""
from __future__ import annotations

from typing import Any


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_progress(item: dict[str, Any]) -> str:
    if "message" in item:
        return f"openclaw: {item['message']}"
    width = len(str(item["max_steps"]))
    parts = [f"step {item['step']:>{width}}/{item['max_steps']}"]
    if "loss" in item:
        parts.append(f"loss {item['loss']:.4f}")
    if "samples_per_s" in item:
        parts.append(f"{item['samples_per_s']:,.0f} samples/s")
    if "eta_s" in item:  # and the evaluations to come, where none has run yet to time
        untimed = item.get("evals_untimed", 0)
        parts.append(f"ETA {format_duration(item['eta_s'])}" +
                     (f" + {untimed} evaluation{'s' if untimed > 1 else ''}" if untimed else ""))
    parts += [f"{k} {v:.4f}" for k, v in item.items() if k.startswith("val/")]
    if "eval_s" in item:  # an evaluation: how much it scored, and how long it took
        seconds = item["eval_s"]
        took = f"{seconds:.{2 if seconds < 1 else 1}f}s" if seconds < 60 else format_duration(seconds)
        parts.append(f"({item['eval_rows']:,} rows in {took})")
    return "  ".join(parts)
