"""One rank's profile, summarized from its Chrome trace (pure: the trace's JSON in, a `RankSummary` out;
runs on each profiled rank after the capture, and in tests on a recorded trace).

How the trace is read:
- steps: the profiler's `ProfilerStep#<n>` annotations, one per profiled step, on the loop's thread;
- phases: the `openclaw/<label>` labels (`engine.engine.phase`) the attempt and the engine put around
  the data, the engine's step, its forward/backward and the checkpoint; the optimizer phase is the rest
  of the engine's step (unscaling, clipping, the update);
- communication: the collectives' own events, wherever they run (gloo's threads, NCCL kernels, c10d
  ops): every event whose name holds one of `COMM_MARKS`. The *exposed* part is what no compute
  overlaps: on a GPU, while no other kernel runs; on a CPU, while the loop's thread runs no operator;
- operators by self time (`cpu_op` events, nesting resolved per thread), and kernels by time;
- memory: the `[memory]` events of `profile_memory`; each allocation counts in the category of where it
  was made, and the categories are summed over what is alive at the peak.
Times are absolute (µs since the epoch: the trace's `baseTimeNanoseconds` plus `ts`), so that ranks on
different nodes line up on one axis, as well as their clocks agree.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

PHASES = ("data", "forward_backward", "optimizer", "checkpoint")
LABELS = ("data", "step", "forward_backward", "checkpoint")
"""The labels the loop puts (`openclaw/<label>`); `optimizer` is `step` less `forward_backward`."""
LABEL = "openclaw/"
COMM_MARKS = ("nccl", "gloo:", "c10d::", "all_reduce", "allreduce", "reduce_scatter", "reducescatter",
              "all_gather", "allgather", "all_to_all", "alltoall", "record_param_comms")
"""Lower-case name parts of collective events (a name like `aten::broadcast_tensors` is no collective)."""
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
BACKWARD = "autograd::engine::evaluate_function"
MEMORY_CATEGORIES = ("before the profile", "data", "forward", "backward", "communication", "optimizer",
                     "checkpoint", "other")
"""Where an allocation alive at the peak was made. "before the profile": what the allocator held when the
profile began (a GPU's parameters, gradients and optimizer state; on a CPU the profiler sees none)."""
TOP = 15

Interval = tuple[float, float]


class Event(NamedTuple):
    start: float
    end: float
    name: str
    cat: str
    tid: Any


@dataclass
class RankSummary:
    rank: int
    steps: list[Interval]
    """The profiled steps (absolute µs)."""
    intervals: dict[str, list[Interval]]
    """Per category, merged, within the steps: each of `PHASES`, `communication` (exposed) and
    `collectives` (all communication, hidden by compute or not)."""
    seconds: dict[str, float]
    """The total length of each category's intervals."""
    wall_s: float
    """The profiled steps' wall time."""
    top_ops: list[dict[str, Any]]
    """Operators by self time: name, self_ms, total_ms, calls (over all profiled steps)."""
    top_kernels: list[dict[str, Any]]
    """GPU kernels and copies by time: name, total_ms, calls (empty on a CPU)."""
    memory: dict[str, Any]
    """device, peak_bytes, by_category (`MEMORY_CATEGORIES`), peak_phase; empty without `profile.memory`."""
    kernel_idle_frac: float | None
    """The share of the steps' compute (forward/backward and optimizer) with no kernel running (GPU traces
    only): launch gaps."""
    device: dict[str, Any]
    """type (cpu, cuda), and for a GPU its name, capability and memory_bytes."""
    process: dict[str, Any] = field(default_factory=dict)
    """Measured by the worker beside its trace: peak_memory_bytes (the process's peak: the CUDA
    allocator's, or on a CPU the resident set's), memory_capacity_bytes (see `engine.metrics`), and the
    bytes of state this rank holds (state_bytes) and checkpoints (checkpoint_bytes: parameters, optimizer)."""

    def frac(self, category: str) -> float:
        return self.seconds.get(category, 0.0) / self.wall_s if self.wall_s else 0.0

    @property
    def idle_frac(self) -> float:
        """The share of the steps in no phase: the loop's own work (logging, evaluation, the stop vote)."""
        covered = union([iv for c in (*PHASES, "communication") for iv in self.intervals.get(c, [])])
        return max(0.0, 1.0 - length(covered) / 1e6 / self.wall_s) if self.wall_s else 0.0

    @property
    def busy_s(self) -> float:
        """Data and compute, exposed communication out (as `perf/straggler_index` counts it)."""
        s = self.seconds
        compute = s.get("forward_backward", 0.0) + s.get("optimizer", 0.0)
        return s.get("data", 0.0) + compute - s.get("communication", 0.0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- intervals -----------------------------------------------------------------------------------


def union(intervals) -> list[Interval]:
    """Sorted, merged, without empty ones (an event of no duration covers no time)."""
    out: list[Interval] = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Of two unions."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """`a` less `b` (two unions)."""
    out, j = [], 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, cur = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def length(intervals: list[Interval]) -> float:
    return sum(e - s for s, e in intervals)


def _inside(unioned: list[Interval] | None, t: float) -> bool:
    if not unioned:
        return False
    i = bisect.bisect_right(unioned, (t, float("inf"))) - 1
    return i >= 0 and unioned[i][0] <= t < unioned[i][1]


def is_comm(name: str) -> bool:
    low = name.lower()
    return any(mark in low for mark in COMM_MARKS)


# ---- the summary ---------------------------------------------------------------------------------


def summarize(trace: dict[str, Any], rank: int | None = None, top: int = TOP) -> RankSummary:
    """The summary of one rank's Chrome trace (`torch.profiler`'s `export_chrome_trace`, parsed)."""
    base = trace.get("baseTimeNanoseconds", 0) / 1000
    events = [Event(base + e["ts"], base + e["ts"] + e["dur"], e.get("name", ""), e.get("cat", ""), e.get("tid"))
              for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    host_marks = [e for e in events if e.cat == "user_annotation"]  # not their GPU copies (gpu_user_annotation)
    marks = [e for e in host_marks if e.name.startswith("ProfilerStep#")]
    if not marks:
        raise ValueError("the trace has no ProfilerStep# events: it was not recorded with a profiler schedule")
    main = marks[0].tid
    steps = sorted((e.start, e.end) for e in marks)
    window = union(steps)
    labelled = {p: union((e.start, e.end) for e in host_marks if e.name == LABEL + p) for p in LABELS}
    labelled["optimizer"] = subtract(labelled.pop("step"), labelled["forward_backward"])
    intervals = {p: intersect(labelled[p], window) for p in PHASES}
    device_events = [e for e in events if e.cat in DEVICE_CATS]
    collectives = intersect(union((e.start, e.end) for e in events if is_comm(e.name)), window)
    computing = (union((e.start, e.end) for e in device_events if not is_comm(e.name)) if device_events else
                 union((e.start, e.end) for e in events if e.cat == "cpu_op" and e.tid == main and not is_comm(e.name)))
    intervals["communication"] = subtract(collectives, computing)
    # what a micro-batch's compute leaves out: not the optimizer's (the finite-loss all-reduce, say)
    intervals["communication_in_forward_backward"] = intersect(intervals["communication"], intervals["forward_backward"])
    intervals["collectives"] = collectives
    wall_s = length(window) / 1e6
    host = [e for e in events if e.cat not in DEVICE_CATS and window[0][0] <= e.start < window[-1][1]]
    kernels = [e for e in device_events if window[0][0] <= e.start < window[-1][1]]
    mem = [e for e in trace.get("traceEvents", []) if e.get("name") == "[memory]"]
    return RankSummary(
        rank=rank if rank is not None else trace.get("distributedInfo", {}).get("rank", 0),
        steps=steps, intervals=intervals, seconds={k: length(v) / 1e6 for k, v in intervals.items()}, wall_s=wall_s,
        top_ops=top_operators(host, top), top_kernels=top_kernels(kernels, top),
        memory=memory_at_peak(mem, base, events, labelled) if mem else {},
        kernel_idle_frac=_kernel_idle_frac(kernels, intervals),
        device=_device(trace, kernels))


def _kernel_idle_frac(kernels: list[Event], intervals: dict[str, list[Interval]]) -> float | None:
    """The share of the compute phases (forward/backward, optimizer) with no kernel running: launch gaps.
    The data wait, checkpoints and the loop's own time are other rules' findings, not launch gaps."""
    compute = union(intervals["forward_backward"] + intervals["optimizer"])
    if not kernels or not compute:
        return None
    busy = intersect(union((e.start, e.end) for e in kernels), compute)
    return 1.0 - length(busy) / length(compute)


def top_operators(host: list[Event], top: int = TOP) -> list[dict[str, Any]]:
    """`cpu_op` events by self time (their time less their children's on the same thread)."""
    own = [e.end - e.start for e in host]
    order = sorted(range(len(host)), key=lambda i: (str(host[i].tid), host[i].start, -host[i].end))
    stack: list[int] = []
    for i in order:
        e = host[i]
        while stack and (host[stack[-1]].tid != e.tid or host[stack[-1]].end <= e.start):
            stack.pop()
        if stack:
            own[stack[-1]] -= min(e.end, host[stack[-1]].end) - e.start
        stack.append(i)
    by: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for e, self_us in zip(host, own):
        if e.cat == "cpu_op":
            row = by[e.name]
            row[0], row[1], row[2] = row[0] + self_us, row[1] + e.end - e.start, row[2] + 1
    rows = [{"name": n, "self_ms": s / 1e3, "total_ms": t / 1e3, "calls": c} for n, (s, t, c) in by.items()]
    return sorted(rows, key=lambda r: (-r["self_ms"], r["name"]))[:top]


def top_kernels(kernels: list[Event], top: int = TOP) -> list[dict[str, Any]]:
    by: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by[e.name][0] += e.end - e.start
        by[e.name][1] += 1
    rows = [{"name": n, "total_ms": t / 1e3, "calls": c} for n, (t, c) in by.items()]
    return sorted(rows, key=lambda r: (-r["total_ms"], r["name"]))[:top]


def memory_at_peak(mem: list[dict[str, Any]], base: float, events: list[Event],
                   phases: dict[str, list[Interval]]) -> dict[str, Any]:
    """The allocator's peak over the profile (the GPU's where there is one) and what was alive then, by
    where it was allocated (`MEMORY_CATEGORIES`). `phases`: each phase's intervals (disjoint)."""
    on_gpu = any(m["args"].get("Device Type") == 1 for m in mem)
    mem = sorted((m for m in mem if (m["args"].get("Device Type") == 1) == on_gpu), key=lambda m: m["ts"])
    where = _Locator(events, phases)
    live: dict[Any, tuple[int, str]] = {}
    sums: dict[str, int] = defaultdict(int)
    peak, at_peak, peak_t = None, {}, None
    for m in mem:
        a, t = m["args"], base + m["ts"]
        if a["Bytes"] > 0:
            cat = where.category(t, m.get("tid"))
            live[a["Addr"]] = (a["Bytes"], cat)
            sums[cat] += a["Bytes"]
        elif a["Addr"] in live:
            size, cat = live.pop(a["Addr"])
            sums[cat] -= size
        if peak is None or a["Total Allocated"] > peak:
            peak, at_peak, peak_t = a["Total Allocated"], dict(sums), t
    by = {c: at_peak.get(c, 0) for c in MEMORY_CATEGORIES[1:]}
    by = {"before the profile": max(0, peak - sum(by.values())), **by}
    return {"device": "cuda" if on_gpu else "cpu", "peak_bytes": peak, "by_category": by,
            "peak_phase": where.phase(peak_t) or "other"}


class _Locator:
    """Where an allocation was made: in a collective, in the backward (on its own thread, which on a GPU is
    autograd's), else the phase the loop's thread was in."""

    def __init__(self, events: list[Event], phases: dict[str, list[Interval]]):
        by_tid: dict[Any, list[Event]] = defaultdict(list)
        for e in events:
            by_tid[e.tid].append(e)
        self.comm = {t: union((e.start, e.end) for e in es if is_comm(e.name)) for t, es in by_tid.items()}
        self.backward = {t: union((e.start, e.end) for e in es if e.name.startswith(BACKWARD))
                         for t, es in by_tid.items()}
        self.phases = sorted((s, e, p) for p in PHASES for s, e in phases.get(p, []))

    def phase(self, t: float | None) -> str | None:
        i = bisect.bisect_right(self.phases, (t, float("inf"), "")) - 1 if t is not None else -1
        return self.phases[i][2] if i >= 0 and self.phases[i][0] <= t < self.phases[i][1] else None

    def category(self, t: float, tid) -> str:
        if _inside(self.comm.get(tid), t):
            return "communication"
        if _inside(self.backward.get(tid), t):
            return "backward"
        phase = self.phase(t)
        return "forward" if phase == "forward_backward" else phase or "other"


def _device(trace: dict[str, Any], kernels: list[Event]) -> dict[str, Any]:
    props = trace.get("deviceProperties") or []
    if not props and not kernels:
        return {"type": "cpu"}
    p = props[0] if props else {}
    return {"type": "cuda", "name": p.get("name"), "memory_bytes": p.get("totalGlobalMem"),
            "capability": [p["computeMajor"], p["computeMinor"]] if "computeMajor" in p else None}
