"""Data parallelism by replication: PyTorch's DistributedDataParallel (plain torch; worker process).

Every rank holds the whole model, its gradients and its optimizer state. Gradients are all-reduced
(averaged) once per optimizer step, during the backward pass of the last micro-batch; the earlier
ones accumulate locally under `no_sync`. With one rank (or no process group) the model is not wrapped.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from openclaw.engine.parallel.base import Batch, StepFns, evaluate_each
from openclaw.engine.parallel.fsdp import apply_activation_checkpointing


def distributed_world() -> int:
    """The default process group's size, or 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DDPStrategy:
    name, sharded = "ddp", False

    def __init__(self, activation_checkpointing: str = "none"):
        self.ac = activation_checkpointing

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        apply_activation_checkpointing(model, self.ac)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = model.to(device)
        if distributed_world() == 1:
            return model
        if device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[device], output_device=device)
        return DistributedDataParallel(model)

    def forward_backward(self, model: nn.Module, micro_batches: list[Batch],
                         fns: StepFns) -> tuple[list[torch.Tensor], int]:
        losses, samples, last = [], 0, len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            with self._sync(model, i == last):
                loss, count = fns.loss(model, batch)
                fns.backward(loss)
            losses.append(loss.detach())
            samples += count
        return losses, samples

    def _sync(self, model: nn.Module, last: bool):
        # DDP all-reduces on every backward unless told not to: accumulate locally until the last micro-batch.
        if last or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        # After the all-reduce every rank holds the same (global) gradients: the local norm is global.
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm is None:
            norms = [p.grad.detach().norm() for p in params]
            return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        return nn.utils.clip_grad_norm_(params, max_norm)

    def evaluate(self, model: nn.Module, batches, fns: StepFns) -> dict[str, float]:
        return evaluate_each(self.unwrap(model), batches, fns)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": self.unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        self.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def load_full_model(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.unwrap(model).load_state_dict(state)
