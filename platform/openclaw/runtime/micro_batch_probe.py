"""The probe behind `train.micro_batch_size: auto` (worker process): one rank's largest micro-batch that
fits its memory budget, measured on its own device with a bare copy of the model, touching no process
group (`runtime.micro_batch` agrees on one size across the ranks and records it).
"""
from __future__ import annotations

import numpy as np
import torch

from openclaw.config import Config
from openclaw.data.stream import ShardedData
from openclaw.engine.memory import (CUDA_HEADROOM, GB, MicroBatchChoice, choose_micro_batch, confirm_micro_batch,
                                    cuda_peak_bytes, micro_batch_sizes, per_sample_bytes, saved_activation_bytes,
                                    state_bytes_estimate)
from openclaw.engine.metrics import memory_capacity_bytes
from openclaw.engine.models import build_model
from openclaw.engine.parallel.build import layout_for
from openclaw.engine.precision import Precision
from openclaw.engine.tasks import build_task

PROBE_SAMPLES = 4
"""The probe measures activations at micro-batches of this many samples and twice as many."""


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
