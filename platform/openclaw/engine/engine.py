"""The per-worker engine: model, precision, optimizer, LR schedule, gradient accumulation and the step.

Plain PyTorch, no Ray: it runs the same in one process (tests, `bench/engine_overhead.py`, a GPU box
without Ray) and inside a Ray Train worker, where the model arrives wrapped in DDP.

One optimizer step consumes a list of micro-batches. Each micro-batch's loss is a *sum* over its
samples, scaled by ``world_size / global_batch_size``; DDP averages gradients over the world, so the
gradient is exactly the mean over the global batch, whatever the world size and accumulation.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from openclaw.config import OptimizerConfig, ScheduleConfig, TrainConfig
from openclaw.engine.tasks import Batch, Task


def lr_at(step: int, base_lr: float, schedule: ScheduleConfig, max_steps: int) -> float:
    """The LR of global step `step`: a pure function of the step, so it survives restarts and resizes."""
    if step < schedule.warmup_steps:
        return base_lr * (step + 1) / schedule.warmup_steps
    if schedule.name == "constant":
        return base_lr
    span = max(1, max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    floor = schedule.min_lr_ratio * base_lr
    if schedule.name == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr - (base_lr - floor) * progress


def configure_cpu(train: TrainConfig, cpus: int) -> None:
    """Process-wide CPU settings, the same in every attempt so that a restart reproduces the run bit for
    bit: intra-op threads (`train.threads_per_worker`, else the worker's CPUs) and flushing subnormals."""
    torch.set_num_threads(train.threads_per_worker or max(1, cpus))
    torch.set_flush_denormal(train.flush_denormal)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norms: the usual choice for transformers, harmless for MLPs.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=cfg.betas)


@dataclass
class StepStats:
    """What one optimizer step reports. `loss_sum`/`samples` are this worker's share, not yet reduced."""
    loss_sum: float
    samples: int
    lr: float
    grad_norm: float
    finite: bool


class Engine:
    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, *, device: torch.device | None = None,
                 world_size: int = 1, global_batch_size: int | None = None, lr_factor: float = 1.0):
        """`global_batch_size` and `lr_factor` default to the config's batch and 1; the elastic
        `scale_lr` policy sets them per world size (see `sampler.batch_plan`)."""
        self.model, self.task, self.cfg = model, task, cfg
        self.device = device or next(model.parameters()).device
        self.world_size, self.lr_factor = world_size, lr_factor
        self.dtype = resolve_precision(cfg.precision, self.device)
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self._loss_scale = world_size / (global_batch_size or cfg.global_batch_size)
        self._can_skip_sync = hasattr(model, "no_sync")  # DDP

    # ---- the step ----------------------------------------------------------------------------

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats:
        """Forward/backward every micro-batch, then one optimizer step at the LR of `step`.

        One device-to-host read per step (loss and grad norm together), as in a bare loop.
        """
        if not self.model.training:  # model.train() walks every module; evaluate() is the only other mode
            self.model.train()
        lr = lr_at(step, self.cfg.optimizer.lr * self.lr_factor, self.cfg.schedule, self.cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, samples = [], 0
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            with self._no_sync(i < last), self.autocast():
                loss, count = self.task.loss(self.model, self._to_device(batch))
            self.scaler.scale(loss * self._loss_scale).backward()
            losses.append(loss.detach())
            samples += count
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        loss_sum, norm = torch.stack([torch.stack(losses).float().sum(), grad_norm.float()]).tolist()
        finite = math.isfinite(loss_sum) and math.isfinite(norm)
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss_sum, samples, lr, norm, finite)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Sums of the task's eval metrics over `batches` (this worker's share)."""
        self.model.eval()
        totals: dict[str, float] = {}
        for batch in batches:
            with self.autocast():
                sums = self.task.eval_sums(self._unwrapped(), self._to_device(batch))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
        return totals

    # ---- helpers -----------------------------------------------------------------------------

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _no_sync(self, skip_sync: bool):
        # DDP all-reduces on every backward unless told not to; accumulate locally until the last micro-batch.
        return self.model.no_sync() if skip_sync and self._can_skip_sync else contextlib.nullcontext()

    def _clip(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip is None:
            norms = [p.grad.detach().norm() for p in params]
            return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        return nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _unwrapped(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"model": self._unwrapped().state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._unwrapped().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
