"""Performance and system metrics of the training loop (plain torch and psutil; worker process).

`StepClock` splits each step's wall-clock time into data (gathering the batch), compute (the engine's
step, which ends with one device-to-host read, so its time is real on GPUs too) and checkpoint
stalls, and turns a logging window into `perf/` metrics. `system_metrics` samples the node a worker
runs on; the loop gathers one sample per node at each log step, as `system/node<i>/...`.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from openclaw.engine.flops import mfu


class StepClock:
    """Accumulates the time split of the steps in one logging window (this rank's)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.data_s = self.compute_s = self.checkpoint_s = self.comm_s = 0.0
        self.comm_measured = True
        self.steps = 0

    def add_step(self, data_s: float, compute_s: float, comm_s: float | None = None) -> None:
        """`compute_s` includes the step's exposed collective wait `comm_s` (None: not measured)."""
        self.data_s += data_s
        self.compute_s += compute_s
        if comm_s is None:
            self.comm_measured = False
        else:
            self.comm_s += comm_s
        self.steps += 1

    def rank_vector(self, wall_s: float, rank: int, world: int) -> list[float]:
        """This rank's share of a sum over ranks that carries every rank's time split (`RANK_FIELDS`),
        a slot per rank, so it rides on the window's all-reduce."""
        comm = self.comm_s if self.comm_measured else math.nan
        mine = [self.data_s, self.compute_s - (0.0 if math.isnan(comm) else comm), comm, self.checkpoint_s, wall_s,
                float(self.steps)]
        vec = [0.0] * (len(RANK_FIELDS) * world)
        vec[rank * len(RANK_FIELDS):(rank + 1) * len(RANK_FIELDS)] = mine
        return vec

    def window(self, samples: float, tokens_per_sample: int | None, flops_per_sample: float | None,
               peak: float | None, world: int) -> dict[str, float]:
        """`perf/` metrics of the window (samples: the global count, summed over workers; `peak`: one
        device's peak FLOP/s, None where unknown, as on CPUs)."""
        busy = self.data_s + self.compute_s + self.checkpoint_s
        steps = max(1, self.steps)
        out = {"perf/step_data_s": self.data_s / steps, "perf/step_compute_s": self.compute_s / steps,
               "perf/step_checkpoint_s": self.checkpoint_s / steps,
               "perf/data_wait_frac": self.data_s / busy if busy else 0.0,
               "perf/samples_per_s": samples / busy if busy else 0.0}
        if tokens_per_sample:
            out["perf/tokens_per_s"] = out["perf/samples_per_s"] * tokens_per_sample
        if flops_per_sample:
            out["perf/flops_per_s"] = out["perf/samples_per_s"] * flops_per_sample
            if peak:
                out["perf/mfu"] = mfu(out["perf/flops_per_s"], peak, world)
        return out


RANK_FIELDS = ("data", "compute", "comm", "checkpoint", "wall", "steps")
"""One rank's window in `StepClock.rank_vector`: seconds of data wait, compute (collective wait out),
exposed collective wait, checkpoint stalls, the window's wall time, and its steps."""


def rank_breakdown(summed: list[float]) -> dict[str, float]:
    """The window's per-rank time split, from the all-reduced `rank_vector`s (pure):

    - `perf/rank<i>/{data,compute,comm,checkpoint,idle}_frac`: of rank i's wall time, summing to one;
      idle is what none of the others account for: the loop's own work, logging (an evaluation is out
      of the window: `perf/eval_s`);
    - `perf/comm_frac`, `perf/idle_frac`, `perf/step_comm_s`: the largest rank's;
    - `perf/step_net_compute_s`: the median rank's compute per step, its exposed collective wait out
      (rank 0's `perf/step_compute_s` less another rank's wait would mix ranks: a rank that waits on a
      slow one can wait longer than the other computes);
    - `perf/straggler_index`: the busiest rank's busy time (data + compute) over the median rank's, and
      `perf/slowest_rank`. A slow rank makes the others wait in the collectives, so their comm grows
      while its own busy time stands out.
    Communication keys are left out where a rank's strategy does not measure it (NaN)."""
    width = len(RANK_FIELDS)
    ranks = [dict(zip(RANK_FIELDS, summed[i:i + width])) for i in range(0, len(summed), width)]
    out: dict[str, float] = {}
    comm_known = all(not math.isnan(r["comm"]) for r in ranks)
    for i, r in enumerate(ranks):
        wall = r["wall"] or 1.0
        comm = r["comm"] if comm_known else 0.0
        idle = max(0.0, r["wall"] - r["data"] - r["compute"] - comm - r["checkpoint"])
        out.update({f"perf/rank{i}/data_frac": r["data"] / wall, f"perf/rank{i}/compute_frac": r["compute"] / wall,
                    f"perf/rank{i}/checkpoint_frac": r["checkpoint"] / wall, f"perf/rank{i}/idle_frac": idle / wall})
        if comm_known:
            out[f"perf/rank{i}/comm_frac"] = comm / wall
    idles = [out[f"perf/rank{i}/idle_frac"] for i in range(len(ranks))]
    out["perf/idle_frac"] = max(idles)
    if comm_known:
        out["perf/comm_frac"] = max(out[f"perf/rank{i}/comm_frac"] for i in range(len(ranks)))
        out["perf/step_comm_s"] = max(r["comm"] / max(1.0, r["steps"]) for r in ranks)
    out["perf/step_net_compute_s"] = statistics.median(r["compute"] / max(1.0, r["steps"]) for r in ranks)
    busy = [r["data"] + r["compute"] for r in ranks]
    median = statistics.median(busy)
    slowest = max(range(len(busy)), key=busy.__getitem__)
    out["perf/straggler_index"] = busy[slowest] / median if median > 0 else 1.0
    out["perf/slowest_rank"] = float(slowest)
    return out


def system_metrics(device: torch.device) -> dict[str, float]:
    """This node's CPU and memory use, and this worker's GPU memory and utilization where it has one."""
    import psutil
    vm = psutil.virtual_memory()
    out = {"cpu_percent": psutil.cpu_percent(interval=None), "memory_percent": vm.percent,
           "memory_used_gb": (vm.total - vm.available) / 1e9}
    if device.type == "cuda":
        out["gpu_memory_gb"] = torch.cuda.memory_allocated(device) / 1e9
        out["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        try:
            out["gpu_utilization_percent"] = float(torch.cuda.utilization(device))
        except Exception:  # needs pynvml; memory is still reported
            pass
    return out


SYSTEM_KEYS = ("cpu_percent", "memory_percent", "memory_used_gb", "gpu_memory_gb", "gpu_memory_peak_gb",
               "gpu_utilization_percent")


def node_sample_vector(local: dict[str, float] | None, rank: int, world: int) -> list[float]:
    """This rank's share of a sum over ranks that carries one system sample per node: a slot per rank,
    filled only by a node's first rank (`local`), so it rides on the loss all-reduce (no extra collective)."""
    width = len(SYSTEM_KEYS) + 1
    vec = [0.0] * (width * world)
    if local is not None:
        vec[rank * width] = 1.0  # this rank speaks for its node
        vec[rank * width + 1:(rank + 1) * width] = [local.get(k, math.nan) for k in SYSTEM_KEYS]
    return vec


def per_node_metrics(summed: list[float]) -> dict[str, float]:
    """`system/node<i>/<name>` from the all-reduced `node_sample_vector`s, nodes numbered in rank order."""
    width, out, node = len(SYSTEM_KEYS) + 1, {}, 0
    for start in range(0, len(summed), width):
        if summed[start] >= 1.0:
            out.update({f"system/node{node}/{k}": v for k, v in zip(SYSTEM_KEYS, summed[start + 1:start + width])
                        if not math.isnan(v)})
            node += 1
    return out


def now() -> float:
    return time.perf_counter()


def _alone() -> bool:
    """No process group, or one of one rank: a collective is its own input."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


def allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums of `values` over every rank (one all-reduce; the values as they are without a group)."""
    if _alone():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def allgather_ints(values: list[int], device: torch.device, world: int) -> list[list[int]]:
    """Every rank's `values`, in rank order (one collective on the default group)."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [values]
    if device.type == "cuda":  # before the model's wrap sets it: NCCL talks from the current device
        torch.cuda.set_device(device)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
    return local.numel() * local.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds of the model's parameters, their gradients and the optimizer's state."""
    params = list(model.parameters())
    optim = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": sum(_local_bytes(p) for p in params),
            "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None), "optimizer": optim}


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: CUDA's allocator peak on a GPU, the peak resident set size on a CPU. The
    resident peak is the process image's own (Linux's VmHWM): `ru_maxrss` survives exec, so a process
    started from a larger one would report its parent's size at the fork."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # kB
    except (OSError, StopIteration):  # not Linux
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_capacity_bytes(device: torch.device, workers_on_node: int = 1, budget_gb: float | None = None) -> int:
    """What one worker may fill: a GPU's memory, or on a CPU its share of the node's memory; at most
    `budget_gb` (`train.memory_budget_gb`) where set."""
    if device.type == "cuda":
        capacity = int(torch.cuda.get_device_properties(device).total_memory)
    else:
        import psutil
        capacity = int(psutil.virtual_memory().total // max(1, workers_on_node))
    return min(capacity, int(budget_gb * 1e9)) if budget_gb else capacity


def start_allreduce_max(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start the maximum of `t` over every rank, in place, in the background; the returned function waits
    for it and gives `t` (at once where there is one rank)."""
    if _alone():
        return lambda: t
    work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
    return lambda: (work.wait(), t)[1]


def allreduce_max(values: list[float], device: torch.device) -> list[float]:
    """The maxima of `values` over every rank."""
    if _alone():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
