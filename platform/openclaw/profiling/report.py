"""The profile's HTML report (pure: the profiled ranks' summaries and the advice in, one HTML string out;
rank 0 after a profile). It is read in MLflow's artifact view, so it is self-contained: inline CSS and
SVG, no script, nothing fetched. Hovering a segment shows its time (SVG `<title>`).

Sections: the time split per rank; the timeline, one row per rank on one time axis, coloured by phase
(exposed communication over the phase it stalls, and under each row a thin band of every collective,
hidden or not); the top operators and kernels; the memory peak by category; the recommendations.
"""
from __future__ import annotations

import html
import math
from collections import defaultdict
from typing import Any

from openclaw.profiling.summary import MEMORY_CATEGORIES, PHASES, RankSummary, union

COLORS = {"forward_backward": "#4c78a8", "optimizer": "#54a24b", "data": "#f58518", "checkpoint": "#9d755d",
          "communication": "#e45756", "collectives": "#e45756", "idle": "#e8e8e8"}
NAMES = {"data": "data wait", "forward_backward": "forward/backward", "optimizer": "optimizer",
         "checkpoint": "checkpoint", "communication": "communication (exposed)",
         "collectives": "collectives (all, hidden or not)", "idle": "other (the loop's own work)"}
MEMORY_COLORS = dict(zip(MEMORY_CATEGORIES, ("#bab0ac", "#f58518", "#4c78a8", "#72b7b2", "#e45756", "#54a24b",
                                             "#9d755d", "#d3d3d3")))
WIDTH, LEFT, ROW, GAP = 1100, 70, 24, 12
CSS = """body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #eee}
td:first-child,th:first-child{text-align:left}td.name{text-align:left;font-family:monospace;max-width:640px;
overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.meta{color:#555}.legend span{display:inline-block;
margin-right:16px}.legend i{display:inline-block;width:12px;height:12px;margin-right:5px;vertical-align:-1px}
.advice li{margin-bottom:8px}code{background:#f3f3f3;padding:1px 4px;border-radius:3px}"""


def render(summaries: list[RankSummary], recommendations: list[Any], *, title: str,
           meta: dict[str, Any] | None = None) -> str:
    """The report. `recommendations`: `advice.rules.Recommendation`s (or their dicts), most at stake first;
    `meta`: a few lines about the run (name, steps, device, precision), shown under the title."""
    ranks = sorted(summaries, key=lambda s: s.rank)
    body = [f"<h1>{_e(title)}</h1>",
            "".join(f'<div class="meta">{_e(k)}: {_e(v)}</div>' for k, v in (meta or {}).items()),
            "<h2>Time per step, by phase</h2>", _split_table(ranks),
            "<h2>Timeline</h2>", _legend(), timeline_svg(ranks),
            "<h2>Top operators (self time)</h2>", _ops_table(ranks)]
    if any(s.top_kernels for s in ranks):
        body += ["<h2>Top GPU kernels</h2>", _kernels_table(ranks)]
    body += ["<h2>Memory at the peak, by category</h2>", _memory(ranks),
             "<h2>Recommendations</h2>", _advice(recommendations)]
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{_e(title)}</title><style>{CSS}</style>'
            f'</head><body>{"".join(body)}</body></html>\n')


# ---- the time split and the timeline -------------------------------------------------------------


def _split_table(ranks: list[RankSummary]) -> str:
    cols = [*PHASES, "communication"]
    head = "".join(f"<th>{_e(NAMES[c])}</th>" for c in cols)
    rows = []
    for s in ranks:
        per_step = s.wall_s / max(1, len(s.steps))
        cells = "".join(f"<td>{_ms(s.seconds.get(c, 0.0) / max(1, len(s.steps)))} ({s.frac(c):.0%})</td>" for c in cols)
        rows.append(f"<tr><td>rank {s.rank}</td><td>{_ms(per_step)}</td>{cells}<td>{s.idle_frac:.0%}</td></tr>")
    return (f"<table><tr><th>rank</th><th>step</th>{head}<th>other</th></tr>{''.join(rows)}</table>"
            f'<p class="meta">Milliseconds per step (share of the step). Exposed communication is time spent in '
            f"collectives that no compute overlapped: it lies inside the phase it stalls (mostly "
            f"forward/backward).</p>")


def _legend() -> str:
    keys = [*PHASES, "communication", "collectives", "idle"]
    fade = {"collectives": ";opacity:.45"}
    return '<div class="legend">' + "".join(f'<span><i style="background:{COLORS[k]}{fade.get(k, "")}"></i>'
                                            f"{_e(NAMES[k])}</span>" for k in keys) + "</div>"


def timeline_svg(ranks: list[RankSummary]) -> str:
    """One row per rank (`<g class="rank-row" data-rank="r">`) on one time axis over the profiled steps."""
    t0 = min(s.steps[0][0] for s in ranks)
    t1 = max(s.steps[-1][1] for s in ranks)
    span = max(t1 - t0, 1.0)
    scale = (WIDTH - LEFT - 10) / span
    x = lambda t: LEFT + (t - t0) * scale  # noqa: E731
    height = 30 + len(ranks) * (ROW + GAP)
    parts = [f'<svg width="100%" viewBox="0 0 {WIDTH} {height}" style="max-width:{WIDTH}px" font-size="11" '
             f'font-family="sans-serif">', _axis(t0, span, x, height)]
    for i, s in enumerate(ranks):
        y = 24 + i * (ROW + GAP)
        row = [f'<g class="rank-row" data-rank="{s.rank}"><text x="4" y="{y + ROW / 2 + 4}">rank {s.rank}</text>',
               _rect("idle", x(s.steps[0][0]), y, (s.steps[-1][1] - s.steps[0][0]) * scale, ROW, "")]
        for cat in (*PHASES, "communication"):
            for a, b in _coarsen(s.intervals.get(cat, []), 0.6 / scale):
                row.append(_rect(cat, x(a), y, (b - a) * scale, ROW, f"{NAMES[cat]}: {_ms((b - a) / 1e6)}"))
        for a, b in _coarsen(s.intervals.get("collectives", []), 0.6 / scale):
            row.append(_rect("collectives", x(a), y + ROW + 1, (b - a) * scale, 4,
                             f"collective: {_ms((b - a) / 1e6)}", opacity=0.45))
        for k, (a, b) in enumerate(s.steps):
            row.append(f'<line x1="{x(a):.1f}" x2="{x(a):.1f}" y1="{y - 3}" y2="{y + ROW + 5}" stroke="#333" '
                       f'stroke-width="0.6"><title>step {k + 1} of the profile: {_ms((b - a) / 1e6)}</title></line>')
        parts.append("".join(row) + "</g>")
    return "".join(parts) + "</svg>"


def _axis(t0: float, span: float, x, height: int) -> str:
    tick = _nice(span / 1e3 / 8) * 1e3  # µs between ticks, about 8 of them
    out = []
    for k in range(int(span // tick) + 1):
        t = t0 + k * tick
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="14" y2="{height}" stroke="#ddd" stroke-width="0.5"/>'
                   f'<text x="{x(t):.1f}" y="11" text-anchor="middle" fill="#555">{k * tick / 1e3:g} ms</text>')
    return "".join(out)


def _rect(cat: str, x: float, y: float, w: float, h: float, tip: str, opacity: float = 1.0) -> str:
    fade = f' fill-opacity="{opacity}"' if opacity < 1 else ""
    title = f"<title>{_e(tip)}</title>" if tip else ""
    return (f'<rect class="seg {cat}" x="{x:.2f}" y="{y}" width="{max(w, 0.6):.2f}" height="{h}" '
            f'fill="{COLORS[cat]}"{fade}>{title}</rect>')


def _coarsen(intervals: list[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    """Intervals closer than `gap` (less than a pixel apart) as one: a readable row, a small file."""
    return union((a - gap / 2, b + gap / 2) for a, b in intervals) if gap > 0 else intervals


def _nice(x: float) -> float:
    """The 1, 2 or 5 times a power of ten at or above `x`."""
    p = 10 ** math.floor(math.log10(x)) if x > 0 else 1.0
    return next(m * p for m in (1, 2, 5, 10) if m * p >= x)


# ---- operators, kernels, memory, advice ----------------------------------------------------------


def _mean_rows(ranks: list[RankSummary], attr: str, key: str) -> list[tuple[str, dict[str, float]]]:
    """Each name's figures per step, averaged over the profiled ranks whose top list has it (a rank whose list
    left it out did not measure it as 0: counting it so halved an operator at 10 and 9 ms to 5)."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    listed: dict[str, int] = defaultdict(int)
    for s in ranks:
        for r in getattr(s, attr):
            listed[r["name"]] += 1
            for k in ("self_ms", "total_ms", "calls"):
                if k in r:
                    sums[r["name"]][k] += r[k] / max(1, len(s.steps))
    means = {name: {k: v / listed[name] for k, v in figures.items()} for name, figures in sums.items()}
    return sorted(means.items(), key=lambda kv: -kv[1][key])[:15]


def _ops_table(ranks: list[RankSummary]) -> str:
    rows = _mean_rows(ranks, "top_ops", "self_ms")
    if not rows:
        return "<p>No operators recorded.</p>"
    step = sum(s.wall_s / max(1, len(s.steps)) for s in ranks) / len(ranks) * 1e3
    body = "".join(f'<tr><td class="name" title="{_e(n)}">{_e(n)}</td><td>{r["self_ms"]:.3f}</td>'
                   f'<td>{r["self_ms"] / step:.1%}</td><td>{r["total_ms"]:.3f}</td><td>{r["calls"]:.1f}</td></tr>'
                   for n, r in rows)
    return ("<table><tr><th>operator</th><th>self ms/step</th><th>of the step</th><th>total ms/step</th>"
            f"<th>calls/step</th></tr>{body}</table><p class=\"meta\">Means over the profiled ranks.</p>")


def _kernels_table(ranks: list[RankSummary]) -> str:
    body = "".join(f'<tr><td class="name" title="{_e(n)}">{_e(n)}</td><td>{r["total_ms"]:.3f}</td>'
                   f'<td>{r["calls"]:.1f}</td></tr>' for n, r in _mean_rows(ranks, "top_kernels", "total_ms"))
    idle = [f"rank {s.rank}: {s.kernel_idle_frac:.0%}" for s in ranks if s.kernel_idle_frac is not None]
    return (f"<table><tr><th>kernel</th><th>ms/step</th><th>calls/step</th></tr>{body}</table>"
            f'<p class="meta">Share of the steps with no kernel running: {_e(", ".join(idle))}.</p>')


def _memory(ranks: list[RankSummary]) -> str:
    measured = [s for s in ranks if s.memory]
    if not measured:
        return "<p>Not recorded (`profile.memory: false`).</p>"
    head = "".join(f'<th><i style="display:inline-block;width:10px;height:10px;background:{MEMORY_COLORS[c]}">'
                   f"</i> {_e(c)}</th>" for c in MEMORY_CATEGORIES)
    rows = []
    for s in measured:
        m, proc = s.memory, s.process
        cells = "".join(f"<td>{_bytes(m['by_category'].get(c, 0))}</td>" for c in MEMORY_CATEGORIES)
        whole = f"{_bytes(proc['peak_memory_bytes'])}" if proc.get("peak_memory_bytes") is not None else "?"
        rows.append(f"<tr><td>rank {s.rank} ({_e(m['device'])})</td><td>{_bytes(m['peak_bytes'])}</td>"
                    f"<td>{_e(m['peak_phase'])}</td>{cells}<td>{whole}</td></tr>")
    bars = "".join(_memory_bar(s) for s in measured)
    return (f"<table><tr><th>rank</th><th>peak</th><th>during</th>{head}<th>process peak</th></tr>{''.join(rows)}"
            f'</table>{bars}<p class="meta">What was alive at the allocator\'s peak in the profiled steps, by where '
            f"it was allocated. On a CPU the profiler sees only what was allocated during the profile; the process "
            f"peak is the CUDA allocator's peak, or on a CPU the resident set's.</p>")


def _memory_bar(s: RankSummary) -> str:
    total, x, out = max(1, s.memory["peak_bytes"]), 0.0, []
    for c in MEMORY_CATEGORIES:
        w = s.memory["by_category"].get(c, 0) / total * 600
        if w > 0:
            out.append(f'<rect x="{60 + x:.1f}" y="2" width="{w:.1f}" height="14" fill="{MEMORY_COLORS[c]}">'
                       f"<title>{_e(c)}: {_bytes(s.memory['by_category'][c])}</title></rect>")
            x += w
    return (f'<svg width="100%" viewBox="0 0 680 18" style="max-width:680px" font-size="11" font-family="sans-serif">'
            f'<text x="0" y="13">rank {s.rank}</text>{"".join(out)}</svg><br>')


def _advice(recommendations: list[Any]) -> str:
    recs = [r if isinstance(r, dict) else r.as_dict() for r in recommendations]
    if not recs:
        return "<p>No recommendation: no rule found anything to change in these steps.</p>"
    items = []
    for r in recs:
        change = f"Change: <code>--set {_e(r['key'])}={_e(r['value'])}</code>: " if r.get("key") else ""
        effect = r["effect"][:1].upper() + r["effect"][1:] if not change else r["effect"]
        items.append(f"<li><b>{_e(r['finding'])}</b>. {change}{_e(effect)}. "
                     f'<span class="meta">({_e(r["rule"])})</span></li>')
    return f'<ol class="advice">{"".join(items)}</ol>'


def _e(value: Any) -> str:
    return html.escape(str(value))


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms == 0:
        return "0 ms"
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
