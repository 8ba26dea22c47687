"""The per-worker engine: model, precision, optimizer, LR schedule, gradient accumulation and the step.

Plain PyTorch, no Ray: it runs the same in one process (tests, `bench/engine_overhead.py`, a GPU box
without Ray) and inside a Ray Train worker. How the model is spread over the ranks is the strategy's
business (`openclaw.engine.parallel`): the engine hands it the model and the micro-batches, and never
asks which strategy it holds.

One optimizer step consumes a list of micro-batches. Each micro-batch's loss is a *sum* over its
samples, scaled by ``world_size / global_batch_size``; the strategy averages gradients over the world,
so the gradient is exactly the mean over the global batch, whatever the world size and accumulation.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from openclaw.engine.compile import CompileCounters, compile_in_place, compile_options, is_compile_error, uncompile
from openclaw.engine.config import TrainConfig
from openclaw.engine import fp8
from openclaw.engine.metrics import allreduce_max, start_allreduce_max, state_bytes
from openclaw.engine.noise import GradPair, LocalGrad, grad_pair, mean_grad_sq
from openclaw.engine.optim import build_optimizer, lr_at
from openclaw.engine.parallel.base import StepFns, Strategy
from openclaw.engine.parallel.build import build_strategy
from openclaw.engine.precision import Precision, apply_matmul_precision, choose_precision, device_facts
from openclaw.engine.tasks import Batch, Task
from openclaw.errors import CompileError

log = logging.getLogger("openclaw")


def phase(name: str):
    """A label, `openclaw/<name>`, around a phase of the step, for a profile (`openclaw.profiling`): a
    `record_function` while a profiler records, else nothing (a `record_function` costs microseconds even then)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.autograd.profiler.record_function(f"openclaw/{name}")
    return contextlib.nullcontext()


@dataclass
class StepStats:
    """What one optimizer step reports. `loss_sum`/`samples` are this worker's share, not yet reduced."""
    loss_sum: float
    samples: int
    lr: float
    grad_norm: float
    finite: bool
    compiled: bool = False
    """This step compiled (part of) the model: its time is compile time, not training."""
    overflow: bool = False
    """fp16: the scaled gradients overflowed, so the loss scaler skipped the update and lowered its scale
    (a finite loss: not a non-finite step)."""
    comm_s: float | None = None
    """Of the step's time, the collective wait its compute did not hide (None: the strategy does not
    measure it)."""
    grad_pair: GradPair | None = None
    """The gradient noise scale's inputs (`engine.noise`): this rank's small-batch and the global squared
    gradient norms. None when there is nothing to compare (one rank and one micro-batch), the strategy
    cannot measure it, or the step was not finite."""


class Engine:
    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, *, device: torch.device | None = None,
                 world_size: int = 1, global_batch_size: int | None = None, lr_factor: float = 1.0,
                 strategy: Strategy | None = None, precision: Precision | None = None):
        """`model` is the bare model; the strategy (default: DDP, which leaves one process's model as it
        is) wraps it. `world_size` is the data-parallel degree: how many ranks train on different samples.
        `global_batch_size` and `lr_factor` default to the config's batch and 1; the elastic `scale_lr`
        policy sets them per world size (see `runtime.policies.batch_plan`). `precision` defaults to
        `choose_precision` of `cfg.precision` on the device."""
        self.task, self.cfg = task, cfg
        self.device = device or next(model.parameters()).device
        if self.device.type == "meta":
            raise ValueError("a model built on the meta device needs the `device` it trains on")
        self.strategy = strategy or build_strategy()
        self.precision: Precision = precision or choose_precision(cfg.precision, device_facts(self.device), cfg.tf32,
                                                                  cfg.fp8)
        self.fp8_layers = fp8.convert(model) if self.precision.name == "fp8" else []  # before the wrap (torchtitan)
        self.model = self.strategy.wrap(model, self.device)
        self.world_size, self.lr_factor = world_size, lr_factor
        apply_matmul_precision(self.precision)
        self.dtype = self.precision.dtype
        self.optimizer = self._optimizer()
        self.scaler = self._scaler()
        self.state_bytes: dict[str, int] | None = None
        """Bytes this rank holds of parameters, gradients and optimizer state (measured at the first step)."""
        self.compile = compile_options(cfg.compile)
        if self.compile:  # after the strategy's wrap, in place: the model's parameter names stay
            compile_in_place(self.module, self.compile)
        self.compile_counters = CompileCounters() if self.compile else None
        self.fell_back: str | None = None
        """Why the engine trains eager after `train.compile` failed (`fallback: eager`), until read."""
        self.global_batch_size = global_batch_size or cfg.global_batch_size
        self.fns = StepFns(task, self._to_device, self.autocast, world_size / (global_batch_size or cfg.global_batch_size),
                           self.scaler)

    @property
    def module(self) -> nn.Module:
        """The bare model inside the strategy's wrapper."""
        return self.strategy.unwrap(self.model)

    # ---- the step ----------------------------------------------------------------------------

    def train_step(self, step: int, micro_batches: list[Batch], seeds: Sequence[int] = ()) -> StepStats:
        """Forward/backward every micro-batch, then one optimizer step at the LR of `step`. `seeds`: each
        micro-batch's RNG seed (`engine.state.micro_batch_seed`), set before its forward.

        One device-to-host read per step (loss and grad norm together, with the gradient noise scale's
        small-batch norm), as in a bare loop.
        """
        if seeds and len(seeds) != len(micro_batches):  # (a pipeline's chunks take theirs from each micro-batch's)
            raise ValueError(f"{len(seeds)} seeds for {len(micro_batches)} micro-batches: give one each, or none")
        if not self.model.training:  # model.train() walks every module; evaluate() is the only other mode
            self.model.train()
        lr = lr_at(step, self.cfg.optimizer.lr * self.lr_factor, self.cfg.schedule, self.cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        counters = self.compile_counters
        if counters:
            counters.begin()
        t0 = time.perf_counter()
        with phase("forward_backward"):
            try:
                losses, samples = self._forward_backward(micro_batches, list(seeds))
            finally:
                self.fns.seeds = []  # (what a strategy did not take)
        loss = torch.stack(losses).float().sum()
        # Whether any rank's loss is not finite, agreed in the background while the norm is computed. The
        # loss is each data-parallel rank's own share, and the ranks must take the same branch: one whose
        # loss alone was not finite (beside finite gradients everywhere) skipped or rolled back on its own,
        # and its replicas diverged, or met collectives the others never entered.
        lost = start_allreduce_max((~torch.isfinite(loss)).to(torch.float32).reshape(1))
        local = self.strategy.local_grad()  # read with the loss and the norm: no extra synchronization
        small = [self._mean_grad_sq(local)] if local else []
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.strategy.clip_grad_norm(self.model, self.cfg.grad_clip)
        loss_sum, norm, *small_sq = torch.stack([loss, grad_norm.float(), *small]).tolist()
        loss_ok = lost().item() == 0.0  # every rank takes the same branch: a policy's, an overflow's, or the step
        overflow = self.scaler.is_enabled() and loss_ok and not math.isfinite(norm)
        finite = loss_ok and math.isfinite(norm)
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.state_bytes is None and finite:  # once, while gradients and optimizer state both exist
            self.state_bytes = state_bytes(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        compiled = counters.end(time.perf_counter() - t0) if counters else False
        pair = grad_pair(small_sq[0], local.samples, norm, self.global_batch_size) if small_sq and finite else None
        return StepStats(loss_sum, samples, lr, norm, finite or overflow, compiled, overflow,
                         self.strategy.take_comm_s(), grad_pair=pair)

    def _mean_grad_sq(self, local: LocalGrad) -> torch.Tensor:
        """The squared norm of the mean gradient over the local gradient's samples (not read yet)."""
        amp = self.scaler.scale(torch.ones((), device=local.sq_norm.device))  # the fp16 loss scale; 1 without
        return mean_grad_sq(local, self.fns.loss_scale, amp).to(self.device)

    def _forward_backward(self, micro_batches: list[Batch], seeds: list[int]) -> tuple[list[torch.Tensor], int]:
        try:
            self.fns.seeds = list(seeds)
            return self.strategy.forward_backward(self.model, micro_batches, self.fns)
        except Exception as e:
            if not self.compile or not is_compile_error(e):
                raise
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            if self.compile.fallback != "eager":
                raise CompileError(f"torch.compile failed on the model ({why}). Set `train.compile.fallback: eager` "
                                   f"to train uncompiled when compiling fails, or `train.compile: false`.") from e
        log.warning("torch.compile failed (%s); training eager (`train.compile.fallback: eager`)", why)
        self.train_eager()
        self.fell_back = why
        self.optimizer.zero_grad(set_to_none=True)
        self.fns.seeds = list(seeds)
        return self.strategy.forward_backward(self.model, micro_batches, self.fns)

    def train_eager(self) -> None:
        """Uncompiled from here on: after a compile failed (`fallback: eager`), in this attempt and in every
        later one (`TrainState.compile_fell_back`), as the uninterrupted run trains."""
        if self.compile:
            uncompile(self.module)
        self.compile, self.compile_counters = None, None

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Sums of the task's eval metrics over `batches` (this worker's share)."""
        self.model.eval()
        counters, t0 = self.compile_counters, time.perf_counter()
        if counters:
            counters.begin()
        sums = self.strategy.evaluate(self.model, batches, self.fns)
        if counters:  # eval mode compiles graphs of its own: counted as compile time and recompiles
            counters.end(time.perf_counter() - t0)
        self.strategy.take_comm_s()  # evaluation's collectives are not the next step's
        return sums

    # ---- precision ---------------------------------------------------------------------------

    def set_precision(self, precision: Precision) -> None:
        """Train in `precision` from the next step on (a run-time switch), with a scaler of its own. Leaving
        fp8 swaps the float8 Linears back around the same parameters (the optimizer state stays)."""
        if self.fp8_layers and precision.name != "fp8":
            fp8.unconvert(self.module)
            self.fp8_layers = []
        self.precision, self.dtype = precision, precision.dtype
        apply_matmul_precision(precision)
        self.scaler = self.fns.scaler = self._scaler()

    def probe_fp8(self, micro_batches: Batch | list[Batch]) -> tuple[float, float] | None:
        """fp8 pays only where its GEMMs outrun the casts around them: `time_fp8`, then keep fp8 only if
        faster (`fp8.pays`), else `fall_back_from_fp8`. None: nothing to measure (not fp8, or no layer
        converted). Collective under every strategy."""
        timed = self.time_fp8(micro_batches)
        if timed is not None and not fp8.pays(*timed):
            self.fall_back_from_fp8(*timed)
        return timed

    def time_fp8(self, micro_batches: Batch | list[Batch]) -> tuple[float, float] | None:
        """Seconds per micro-batch of a forward and backward of `micro_batches` (one, or a step's: a
        pipeline's 1F1B schedule takes no fewer than its stages) with the float8 Linears, then in bf16:
        the slowest rank's, so every rank decides alike. Trains nothing and leaves the model converted
        as it was. None without float8 layers. Collective: each rank runs both sides."""
        if not self.fp8_layers:
            return None
        batches = [micro_batches] if isinstance(micro_batches, dict) else list(micro_batches)

        def run() -> None:
            self.strategy.forward_backward(self.model, batches, self.fns)
            self.optimizer.zero_grad(set_to_none=True)

        timed = allreduce_max(list(fp8.probe(self.module, run)), self.device)
        self.strategy.take_comm_s()  # the probe's collectives are not the first step's
        fp8_s, bf16_s = (t / len(batches) for t in timed)
        return fp8_s, bf16_s

    def fall_back_from_fp8(self, fp8_s: float, bf16_s: float) -> None:
        """Train in bf16 from the next step on, around the same parameters, saying in the precision's
        reason what the probe measured."""
        bf16 = choose_precision("bf16", device_facts(self.device), self.cfg.tf32)
        self.set_precision(Precision("bf16", bf16.scaler, bf16.tf32,
                                     f"fp8 measured no faster than bf16 here ({fp8_s * 1e3:.1f} ms vs "
                                     f"{bf16_s * 1e3:.1f} ms per micro-batch): {bf16.reason}"))

    def loss_scale(self) -> float | None:
        """fp16: the scaler's current scale (one device-to-host read); None without a scaler."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def _optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.cfg.optimizer, fused=self.device.type == "cuda")

    def _scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, init_scale=self.cfg.amp.init_scale,
                                    enabled=self.precision.scaler)

    # ---- helpers -----------------------------------------------------------------------------

    def autocast(self, cache: bool = True):
        """The precision's autocast (none in fp32). `cache`: keep each weight's cast copy for the rest of
        the context (autocast's default); not around a pipeline schedule's micro-batches, between which a
        sharded stage frees and gathers its weights again: a cached copy of a freed weight took the next
        micro-batches' gradients away from it (every pipeline x FSDP step in fp16 was 15-30% low)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=cache)

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**self.strategy.state_dict(self.model, self.optimizer), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint's weights, optimizer state and loss scale, under this config's optimizer settings:
        torch's `load_state_dict` brings back the saved ones (weight decay, betas, momentum, fused), and a
        resume that changed `train.optimizer.weight_decay` said so and trained on with the old value."""
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.strategy.load_state_dict(self.model, self.optimizer, state)
        for group, setting in zip(self.optimizer.param_groups, settings):
            group.update(setting)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def start_over(self, model_state: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
        """Back to these (initial) weights with a fresh optimizer and loss scaler (fp16: the scale the
        run began with, as a checkpoint's restore brings back its own). `from_rank0`: only rank 0's
        `model_state` holds them (`Strategy.load_full_model`); also how a model built on the meta device
        gets its weights."""
        self.strategy.load_full_model(self.model, model_state, from_rank0)
        self.optimizer = self._optimizer()
        self.scaler = self.fns.scaler = self._scaler()
