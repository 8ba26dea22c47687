"""The optimizer and the learning-rate schedule (plain torch; worker process)."""
from __future__ import annotations

import math

import torch
from torch import nn

from openclaw.engine.config import OptimizerConfig, ScheduleConfig


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


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: Adam and AdamW run as one fused kernel per step (CUDA; the engine asks for it there)."""
    # No weight decay on biases and norms: the usual choice for transformers, harmless for MLPs.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=cfg.betas, **({"fused": True} if fused else {}))
