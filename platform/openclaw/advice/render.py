"""Recommendations as text (pure): console lines, `advice.md` and its JSON twin `advice.json`."""
from __future__ import annotations

import json
import math
import shlex
from typing import Any

from openclaw.advice.measured import Facts, Recommendation


def value_text(value: Any) -> str:
    """A value as `--set key=VALUE` takes it (YAML: compact JSON for booleans, numbers, lists, mappings)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def change_text(rec: Recommendation) -> str | None:
    """The change as a shell takes it: `key=VALUE` quoted where it holds what a shell would split or read."""
    return f"--set {shlex.quote(f'{rec.key}={value_text(rec.value)}')}" if rec.key else None


def line(rec: Recommendation) -> str:
    """One recommendation in one line: the finding, the change, the expected effect."""
    change = change_text(rec)
    return f"{rec.finding}. " + (f"Change: `{change}`: {rec.effect}." if change else f"No key: {rec.effect}.")


def console(recs: list[Recommendation], source: str) -> str:
    """What the driver (and `openclaw advise`) prints: one numbered line per recommendation."""
    if not recs:
        return f"openclaw: advice ({source}): no rule found anything to change."
    lines = [f"openclaw: advice ({source}), most at stake first:"]
    lines += [f"  {i}. [{r.rule}] {line(r)}" for i, r in enumerate(recs, 1)]
    return "\n".join(lines)


def markdown(recs: list[Recommendation], facts: Facts, title: str, source: str) -> str:
    """`advice.md`: the recommendations, then the measurements they were read from."""
    out = [f"# Advice: {title}", "", f"From {source}. Most at stake first.", ""]
    if not recs:
        out += ["No rule found anything to change.", ""]
    for i, r in enumerate(recs, 1):
        change = change_text(r)
        out += [f"{i}. **{r.rule}**: {r.finding}.",
                f"   - change: `{change}`" if change else "   - change: not a config key",
                f"   - expected: {r.effect}", ""]
    out += ["## Measured", "", "| fact | value |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in measured(facts).items()]
    return "\n".join(out) + "\n"


def as_json(recs: list[Recommendation], facts: Facts, **about: Any) -> str:
    """`advice.json`: the recommendations and the measured facts, with `about` (run id, source)."""
    return json.dumps({**about, "recommendations": [r.as_dict() for r in recs], "facts": measured(facts)},
                      indent=2, default=str)


def measured(facts: Facts) -> dict[str, Any]:
    """The facts that were measured (config out; None and NaN out)."""
    out = {}
    for k in facts.__dataclass_fields__:  # not asdict: it would copy the config
        v = getattr(facts, k)
        if k in ("config", "extra") or v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    out.update({k: v for k, v in facts.extra.items() if v is not None})
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
