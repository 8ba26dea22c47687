"""Where a step's time goes (bench helper): a few steps under `torch.profiler`, and the top operators and
kernels by self time (device time on CUDA, CPU time on CPUs) as a compact table. `bench/engine_overhead.py`
prints it when the engine misses a target, or with `--where`."""
from __future__ import annotations

import time
from typing import Any, Callable

TOP = 10
"""Rows of the table."""


def where_table(rows: list[dict], what: str) -> str:
    """The top operators/kernels (`profile_top`'s rows) as a compact table."""
    lines = [f"   #  self ms/step   share  calls/step  {what}"]
    lines += [f"  {i:2d}  {r['self_ms_per_step']:12.3f}  {100 * r['share']:5.1f}%  {r['calls_per_step']:10.1f}  "
              f"{r['name'][:90]}" for i, r in enumerate(rows, 1)]
    return "\n".join(lines)


def profile_top(step: Callable[[], Any], steps: int, cuda: bool, top: int = TOP) -> dict[str, Any]:
    """Run `step` `steps` times under `torch.profiler`: the `top` kernels (CUDA: device-side events only,
    since each operator also carries its kernels' time) or operators (CPU) by self time per step, with
    their share of all self time, and that total against the wall time of the profiled steps (which
    includes the profiler's own overhead)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if cuda:
        key, events = "self_device_time_total", [e for e in prof.key_averages() if e.device_type != DeviceType.CPU]
    else:
        key, events = "self_cpu_time_total", list(prof.key_averages())
    events = [e for e in events if getattr(e, key) > 0]
    total_us = sum(getattr(e, key) for e in events)
    rows = [{"name": e.key, "self_ms_per_step": round(getattr(e, key) / 1e3 / steps, 4),
             "share": round(getattr(e, key) / total_us, 4), "calls_per_step": round(e.count / steps, 2)}
            for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]]
    return {"clock": "self CUDA time" if cuda else "self CPU time", "steps": steps, "top": rows,
            "self_ms_per_step": round(total_us / 1e3 / steps, 3), "wall_ms_per_step": round(1e3 * wall / steps, 3)}


def print_where(where: dict[str, Any], side: str, why: list[str]) -> None:
    """The table, with the cause (the missed targets, or `--where`) and how busy the profiled steps were."""
    cause = "; ".join(why) if why else "asked for with --where"
    cuda = where["clock"].endswith("CUDA time")
    print(f"where the time goes ({cause}): the {side} side, {where['steps']} steps under torch.profiler, "
          f"top {len(where['top'])} {'kernels' if cuda else 'operators'} by {where['clock']}")
    busy = where["self_ms_per_step"] / where["wall_ms_per_step"]
    rest = ("the rest the GPU idles, waiting on the host" if cuda else
            "the rest is Python outside any operator or label")
    print(f"  {where['clock']} {where['self_ms_per_step']:.2f} ms/step of {where['wall_ms_per_step']:.2f} ms/step wall "
          f"({100 * busy:.0f}%; {rest}; the profiler slows the host too)")
    print(where_table(where["top"], "kernel" if cuda else "operator / label (record_function)"))
