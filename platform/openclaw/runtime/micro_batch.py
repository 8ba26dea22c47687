"""`train.micro_batch_size: auto` on the workers (worker process), before the sampler is built.

Every rank takes the size its run's train state keeps (chosen for the same model, precision, strategy,
device type and memory: the `micro_batch_key`), or else probes its own device for one: the training
state estimated under the strategy and precision, activations measured on a probe micro-batch, the
largest allowed size that fits its memory budget, confirmed on a GPU by a forward and backward at that
size (`engine.memory`). The probe touches no process group, so one rank's out-of-memory error cannot
stall the others. The ranks then all-gather their sizes and all take the smallest, and the rest of the
attempt reads a config that holds that number. The train state records it, so that restarts, resizes
and resumes keep it and the optimization stays the same.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist

from openclaw.config import Config
from openclaw.data.stream import ShardedData
from openclaw.engine.memory import (CUDA_HEADROOM, GB, MicroBatchChoice, choose_micro_batch, confirm_micro_batch,
                                    cuda_peak_bytes, micro_batch_sizes, per_sample_bytes, saved_activation_bytes,
                                    state_bytes_estimate)
from openclaw.engine.metrics import memory_capacity_bytes
from openclaw.engine.models import build_model
from openclaw.engine.parallel.build import layout_for
from openclaw.engine.precision import Precision, choose_precision, device_facts
from openclaw.engine.state import TrainState
from openclaw.engine.tasks import build_task
from openclaw.runtime.checkpoint_store import newest_finished_file
from openclaw.runtime.policies import micro_batch_dp_sizes

PROBE_SAMPLES = 4
"""The probe measures activations at micro-batches of this many samples and twice as many."""


@dataclass(frozen=True)
class AutoMicroBatch:
    """What `auto` resolved to on this attempt, as every rank agreed."""
    size: int
    source: str
    """`probe` (chosen now) or `train_state` (kept from the run's train state)."""
    key: str
    proposed: list[int]
    """Each rank's size before they agreed on the smallest, in rank order."""
    probed: int
    """How many ranks probed their device (0 when every rank kept the train state's size)."""
    estimate_gb: float
    choice: MicroBatchChoice | None = None
    """This rank's probe, when it probed."""
    backed_off: list[int] = field(default_factory=list)
    """Sizes the confirmation probe ran out of memory at."""


def resolve_micro_batch(cfg: Config, *, device: torch.device, world: int, local_world: int, run_dir: str,
                        data: ShardedData) -> tuple[Config, AutoMicroBatch | None]:
    """The config with `train.micro_batch_size` a number (unchanged unless it is `auto`). Collective when
    `auto`: every rank calls it, and one all-gather agrees on the size."""
    if cfg.train.micro_batch_size != "auto":
        return cfg, None
    precision = choose_precision(cfg.train.precision, device_facts(device), cfg.train.tf32, cfg.train.fp8)
    key = choice_key(cfg, device, precision)
    dp_sizes = micro_batch_dp_sizes(cfg.elastic.on_resize, cfg.scaling.min_workers, cfg.scaling.max_workers,
                                    cfg.parallelism.model_parallel)
    stored = stored_state(run_dir)
    if stored and stored.get("micro_batch_key") == key and \
            stored.get("micro_batch_size") in micro_batch_sizes(cfg.train.global_batch_size, dp_sizes):
        mine, choice, backed_off = stored["micro_batch_size"], None, []
    else:
        choice, mine, backed_off = probe(cfg, device, data, precision, dp_sizes, local_world)
    gathered = _all_gather([mine, int(choice is not None)], device, world)
    size = min(g[0] for g in gathered)
    estimate = (choice.fixed_bytes + size * choice.activation_bytes_per_sample) / GB if choice \
        else float(stored.get("micro_batch_estimate_gb", 0.0))
    auto = AutoMicroBatch(size, "probe" if choice else "train_state", key, [g[0] for g in gathered],
                          sum(g[1] for g in gathered), estimate, choice, backed_off)
    return with_micro_batch(cfg, size), auto


def with_micro_batch(cfg: Config, size: int) -> Config:
    raw = cfg.resolved()
    raw["train"]["micro_batch_size"] = size
    return Config.model_validate(raw)


def choice_key(cfg: Config, device: torch.device, precision: Precision) -> str:
    """What a size is chosen for: a new key (another model, precision, strategy, device type or memory)
    chooses again."""
    model = hashlib.sha1(json.dumps([cfg.model.name, cfg.model.kwargs, cfg.task], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    p = cfg.parallelism
    strategy = f"{p.strategy} replicate {p.replicate} tensor {p.tensor} pipeline {p.pipeline} " \
               f"checkpointing {p.activation_checkpointing}"
    if device.type == "cuda":
        memory = f"{torch.cuda.get_device_name(device)} {torch.cuda.get_device_properties(device).total_memory / GB:.0f} GB"
    else:
        memory = f"{psutil.virtual_memory().total / GB:.0f} GB"
    if cfg.train.memory_budget_gb:
        memory += f", budget {cfg.train.memory_budget_gb:g} GB"
    return f"model {cfg.model.name} {model}; precision {precision.name}; strategy {strategy}; " \
           f"device {device.type} {memory}"


def stored_state(run_dir: str) -> dict[str, Any] | None:
    """The train state of the run's newest finished checkpoint (its `state.pt` alone), or None."""
    found = newest_finished_file(run_dir, "state.pt")
    if found is None:
        return None
    try:
        return torch.load(io.BytesIO(found[1]), map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the restore will skip it too
        return None


# ---- the probe -------------------------------------------------------------------------------------

def probe(cfg: Config, device: torch.device, data: ShardedData, precision: Precision, dp_sizes: list[int],
          local_world: int) -> tuple[MicroBatchChoice, int, list[int]]:
    """This rank's choice: the estimate on its device, then (on a GPU) the guarded confirmation."""
    budget, source = budget_bytes(cfg, device, local_world)
    model = build_model(cfg.model.name, cfg.model.kwargs).to(device).train()
    step = _ProbeStep(model, build_task(cfg.task), data, device, precision)
    try:
        num_params = sum(p.numel() for p in model.parameters())
        fixed = max(state_bytes_estimate(num_params, layout_for(cfg.parallelism, w), replicated=replicated(cfg),
                                         precision=precision.name, optimizer=cfg.train.optimizer.name,
                                         momentum=cfg.train.optimizer.momentum).total for w in _worlds(cfg))
        samples = max(1, min(PROBE_SAMPLES, len(data) // 2))
        activations = per_sample_bytes(step.activation_bytes, samples)
        choice = choose_micro_batch(budget, fixed, activations, cfg.train.global_batch_size, dp_sizes, source)
        if device.type != "cuda":  # a CPU has no out-of-memory error to catch: the estimate stands
            return choice, choice.size, []
        sizes = micro_batch_sizes(cfg.train.global_batch_size, dp_sizes)
        size, failed = confirm_micro_batch(choice.size, sizes, lambda m: step.run_beside(m, fixed - 8 * num_params))
        return choice, size, failed
    finally:
        step = model = None  # their memory goes before the cache is emptied
        if device.type == "cuda":
            torch.cuda.empty_cache()


def budget_bytes(cfg: Config, device: torch.device, local_world: int) -> tuple[int, str]:
    """This worker's memory budget and where it comes from (see `train.memory_budget_gb`)."""
    asked = int(cfg.train.memory_budget_gb * GB) if cfg.train.memory_budget_gb else None
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0] * CUDA_HEADROOM)
        if asked is not None and asked < free:
            return asked, "`train.memory_budget_gb`"
        return free, f"{CUDA_HEADROOM:.0%} of the GPU's free memory"
    share = memory_capacity_bytes(device, local_world)
    if asked is not None and asked < share:
        return asked, "`train.memory_budget_gb`"
    return share, (f"the worker's share of the node's memory, {share * max(1, local_world) / GB:.1f} GB / "
                   f"{local_world} worker(s); set `train.memory_budget_gb`")


def replicated(cfg: Config) -> bool:
    """Plain DDP: every rank holds the whole model, with DDP's gradient buckets."""
    return cfg.parallelism.strategy == "ddp" and cfg.parallelism.model_parallel == 1


def _worlds(cfg: Config) -> range:
    return range(cfg.scaling.min_workers, cfg.scaling.max_workers + 1)


class _ProbeStep:
    """Forward (and backward) passes of a bare copy of the model on this rank's device, on the run's
    first rows, in the run's precision: no process group, nothing the engine holds."""

    def __init__(self, model: torch.nn.Module, task, data: ShardedData, device: torch.device, precision: Precision):
        self.model, self.task, self.data, self.device, self.precision = model, task, data, device, precision
        self.warm = device.type != "cuda"

    def _loss(self, m: int) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in self.data.batch(np.arange(m)).items()}
        if self.precision.name == "fp32":
            return self.task.loss(self.model, batch)[0]
        with torch.autocast(self.device.type, dtype=self.precision.dtype):
            return self.task.loss(self.model, batch)[0]

    def _forward_backward(self, m: int) -> None:
        self._loss(m).backward()
        self.model.zero_grad(set_to_none=True)

    def activation_bytes(self, m: int) -> int:
        """CPU: bytes saved for the backward; GPU: the allocator's peak over a forward and backward."""
        if self.device.type != "cuda":
            return saved_activation_bytes(lambda: self._loss(m), self.model.parameters())
        if not self.warm:  # the first pass allocates workspaces once: keep them out of the measure
            self._forward_backward(m)
            self.warm = True
        return cuda_peak_bytes(lambda: self._forward_backward(m), self.device)

    def run_beside(self, m: int, other_bytes: int) -> None:
        """A forward and backward at `m` while `other_bytes` more are held: the state the bare model lacks
        (optimizer state, DDP's buckets). Raises CUDA's out-of-memory error if it does not fit."""
        ballast = torch.empty(max(0, other_bytes), dtype=torch.uint8, device=self.device)
        try:
            self._forward_backward(m)
            torch.cuda.synchronize(self.device)
        finally:
            del ballast
            self.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


def _all_gather(values: list[int], device: torch.device, world: int) -> list[list[int]]:
    """Every rank's `values`, in rank order (one collective on the default group)."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [values]
    if device.type == "cuda":  # before the model's wrap sets it: NCCL talks from the current device
        torch.cuda.set_device(device)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


# ---- recording it ----------------------------------------------------------------------------------

def record_micro_batch(auto: AutoMicroBatch | None, state: TrainState, tracker) -> None:
    """After the restore: the train state keeps the size (or forgets one when the config sets it); rank 0
    records it as an event every attempt, and prints and logs it as params when it was chosen now."""
    state.micro_batch_size = auto.size if auto else 0
    state.micro_batch_key = auto.key if auto else ""
    state.micro_batch_estimate_gb = auto.estimate_gb if auto else 0.0
    if auto is None:
        return
    c = auto.choice
    probe_facts = {"budget_gb": c.budget_bytes / GB, "fixed_gb": c.fixed_bytes / GB,
                   "activation_mb_per_sample": c.activation_bytes_per_sample / 1e6,
                   "largest": c.largest, "backed_off": auto.backed_off} if c else {}
    tracker.event("micro_batch", size=auto.size, source=auto.source, proposed=auto.proposed, probed=auto.probed,
                  estimate_gb=auto.estimate_gb, key=auto.key, step=state.step, **probe_facts)
    if auto.source != "probe":
        return
    tracker.params({"resolved/micro_batch_size": str(auto.size),
                    "resolved/micro_batch_estimate_gb": f"{auto.estimate_gb:.6g}"})
    why = f", of at most {c.largest}, in a {c.budget_bytes / GB:.3g} GB budget" if c else ""
    tracker.progress({"message": f"micro-batch: {auto.size} (`auto`: an estimated {auto.estimate_gb:.3g} GB per "
                                 f"worker{why}; every worker proposed {auto.proposed})"})
