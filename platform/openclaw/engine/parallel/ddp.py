"""Data parallelism by replication: PyTorch's DistributedDataParallel (plain torch; worker process).

Every rank holds the whole model, its gradients and its optimizer state. Gradients are all-reduced
(averaged) once per optimizer step, during the backward pass of the last micro-batch; the earlier
ones accumulate locally under `no_sync`. With one rank (or no process group) the model is not wrapped.

The all-reduce goes through a comm hook that is PyTorch's default one (`allreduce_hook`: divide by the
world size, sum) plus a clock mark: the time from the last bucket's launch to the end of the backward
is the communication the backward did not hide (`CommClock`).

The gradient noise scale's small batch (`local_grad`, see `engine.noise`): with several micro-batches,
the first one's gradient (accumulated under `no_sync`, so still local); with one micro-batch over
several ranks, the hook measures each bucket before the all-reduce. One norm per step either way.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from openclaw.engine.noise import LocalGrad, measure_local
from openclaw.engine.parallel.base import Batch, CommClock, StepFns, apply_activation_checkpointing, evaluate_each


def distributed_world() -> int:
    """The default process group's size, or 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DDPStrategy:
    name, sharded = "ddp", False

    def __init__(self, activation_checkpointing: str = "none", bucket_cap_mb: float = 25.0):
        self.ac = activation_checkpointing
        self.bucket_cap_mb = bucket_cap_mb
        self.comm: CommClock | None = None
        self._local: LocalGrad | None = None
        self._bucket_sq: torch.Tensor | None = None
        self._measure_buckets = False

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        apply_activation_checkpointing(model, self.ac)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = model.to(device)
        if distributed_world() == 1:
            return model
        on_gpu = dict(device_ids=[device], output_device=device) if device.type == "cuda" else {}
        ddp = DistributedDataParallel(model, bucket_cap_mb=self.bucket_cap_mb, **on_gpu)
        self.comm = CommClock(device)
        ddp.register_comm_hook(self, _measured_allreduce)
        return ddp

    def forward_backward(self, model: nn.Module, micro_batches: list[Batch],
                         fns: StepFns) -> tuple[list[torch.Tensor], int]:
        losses, samples, last = [], 0, len(micro_batches) - 1
        self._local, self._bucket_sq, self._measure_buckets = None, None, last == 0
        for i, batch in enumerate(micro_batches):
            with self._sync(model, i == last):
                loss, count = fns.loss(model, batch)
                fns.backward(loss)  # the last one's returns once every bucket's all-reduce is in
            if i == last and self.comm:
                self.comm.done()
            if i == 0 < last:  # the first micro-batch's gradient, not yet all-reduced
                self._local = measure_local(model.parameters(), count)
            losses.append(loss.detach())
            samples += count
        if self._bucket_sq is not None:  # one micro-batch: the hook measured it before the all-reduce
            self._local, self._bucket_sq = LocalGrad(self._bucket_sq, samples), None
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

    def take_comm_s(self) -> float | None:
        return self.comm.take() if self.comm else 0.0  # one rank: nothing to communicate

    def local_grad(self) -> LocalGrad | None:
        return self._local

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": self.unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        self.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def load_full_model(self, model: nn.Module, state: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
        if from_rank0:  # every rank holds the whole model: each builds its own (`engine.initial_model`)
            raise ValueError("DDP loads a whole model on every rank; from_rank0 is for sharded strategies")
        self.unwrap(model).load_state_dict(state)


def _timed_allreduce(clock, bucket):
    """DDP's default all-reduce of one gradient bucket (a `dist.GradBucket`), marking its launch: the last
    launch is when the backward's compute ended, up to the last bucket's own gradients. (Unannotated: DDP
    checks the annotations' values, which `from __future__ import annotations` turns into strings.)"""
    clock.launched()
    return allreduce_hook(None, bucket)


def _measured_allreduce(strategy, bucket):
    """`_timed_allreduce`, and with one micro-batch per step, the squared norm of this rank's bucket
    before the all-reduce (the sum of its gradients: DDP leaves the division to the hook)."""
    if strategy._measure_buckets:
        sq = torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32) ** 2
        strategy._bucket_sq = sq if strategy._bucket_sq is None else strategy._bucket_sq + sq
    return _timed_allreduce(strategy.comm, bucket)
