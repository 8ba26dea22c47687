"""The probe behind `train.micro_batch_size: auto` (worker process): one rank's largest micro-batch that
fits its memory budget, touching no process group (`runtime.micro_batch` agrees on one size across the
ranks and records it). The activations are counted on a copy of the model made of fake tensors, which
hold no memory, so a model of any size can be probed, one that only its shards fit included; on a GPU
with room for a whole copy, where a rank runs the whole model (DDP, FSDP), they are measured as the
allocator's peak and the size is confirmed. Under tensor parallelism a rank's share of them is counted
(`tensor_split`), and under a pipeline they are scaled by what its schedule keeps in flight on each
rank and by the share of them its stages hold, counted (`held_samples`). The copy's blocks
recompute as the engine's do (`parallelism.activation_checkpointing`): the forward saves only their
inputs, and the count adds the activations of the largest one, which its backward holds again.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from openclaw.config import Config
from openclaw.data.stream import ShardedData
from openclaw.engine.memory import (CUDA_HEADROOM, GB, MicroBatchChoice, TensorSplit, choose_micro_batch,
                                    confirm_micro_batch, cuda_peak_bytes, fake_tensors, gathered_bytes,
                                    micro_batch_sizes, part_activation_bytes, per_sample_bytes, probes_on_gpu,
                                    probes_whole, saved_activation_bytes, state_bytes_estimate)
from openclaw.engine.metrics import memory_capacity_bytes
from openclaw.engine.models import build_model
from openclaw.engine.parallel.base import apply_activation_checkpointing, transformer_blocks
from openclaw.engine.parallel.build import layout_for
from openclaw.engine.parallel.layout_checks import pipeline_ends, pipeline_rank_params, stage_activation_shares
from openclaw.engine.parallel.tp import whole_activations
from openclaw.engine.precision import Precision
from openclaw.engine.tasks import build_task
from openclaw.errors import MemoryBudgetError

log = logging.getLogger("openclaw")

PROBE_SAMPLES = 4
"""The probe measures activations at micro-batches of this many samples and twice as many."""


def probe(cfg: Config, device: torch.device, data: ShardedData, precision: Precision, dp_sizes: list[int],
          counts: Callable[[int], bool], local_world: int) -> tuple[MicroBatchChoice, int, list[int], str]:
    """This rank's choice, the sizes it backed off from, and how it measured the activations: counted on
    fake tensors (no memory, whatever the model's size; a tensor-parallel rank's share of them), or where a
    rank runs the whole model (DDP, FSDP) on a GPU with room for a whole copy of it, the allocator's peak,
    then the guarded confirmation. `counts`: the micro-batch counts per rank
    a size may give (`ParallelismConfig.auto_counts`)."""
    budget, source = budget_bytes(cfg, device, local_world)
    task = build_task(cfg.task)
    samples = max(1, min(PROBE_SAMPLES, len(data) // 2))
    try:
        step: _ProbeStep | None = _ProbeStep(cfg, task, data, device, precision, fake=True)
        per_sample = per_sample_bytes(step.activation_bytes, samples)
    except Exception as e:  # a model that cannot run on fake tensors (it reads a value, calls numpy): a real copy
        log.info("could not count the model's activations on fake tensors (%s): probing a real copy", e)
        step = None
    whole_copy = step is None or probes_on_gpu(cfg.parallelism.model_parallel, step.num_params, budget)
    if device.type == "cuda" and whole_copy:
        return _probe_on_gpu(cfg, task, data, device, precision, dp_sizes, counts, samples, budget, source)
    if step is None:
        step = _ProbeStep(cfg, task, data, device, precision, fake=False)
        per_sample = per_sample_bytes(step.activation_bytes, samples)
    choice = choose_micro_batch(budget, fixed_bytes(cfg, step, precision), per_sample, cfg.train.global_batch_size,
                                dp_sizes, source, counts, held_samples(cfg, dp_sizes, step, samples))
    return choice, choice.size, [], "saved tensors, fake" if step.fake else "saved tensors"


def _probe_on_gpu(cfg: Config, task, data: ShardedData, device: torch.device, precision: Precision,
                  dp_sizes: list[int], counts: Callable[[int], bool], samples: int, budget: int,
                  source: str) -> tuple[MicroBatchChoice, int, list[int], str]:
    """A whole copy of the model on the GPU: the allocator's peak over a forward and backward, then a run
    at the chosen size beside the rest of the state, backing off on an out-of-memory error."""
    step = _ProbeStep(cfg, task, data, torch.device("cpu"), precision, fake=False)
    if not probes_whole(step.num_params, budget):
        raise MemoryBudgetError(
            f"`train.micro_batch_size: auto`: the model ({step.num_params / 1e6:.1f}M parameters) has no room on "
            f"{device} whole, and it cannot run on fake tensors to count its activations. Set "
            f"`train.micro_batch_size` to a number.")
    step.to(device)
    try:
        fixed = fixed_bytes(cfg, step, precision)
        choice = choose_micro_batch(budget, fixed, per_sample_bytes(step.activation_bytes, samples),
                                    cfg.train.global_batch_size, dp_sizes, source, counts,
                                    held_samples(cfg, dp_sizes, step, samples))
        sizes = micro_batch_sizes(cfg.train.global_batch_size, dp_sizes, counts)
        size, failed = confirm_micro_batch(choice.size, sizes, lambda m: step.run_beside(m, fixed - 8 * step.num_params))
        return choice, size, failed, "allocator peak, confirmed"
    finally:
        step = None  # its memory goes before the cache is emptied
        torch.cuda.empty_cache()
        # the run's peak (`perf/peak_memory_bytes`, a profile's) is its training's, not this copy's or the
        # out-of-memory tries': else it read near the whole GPU, and the memory rules advised on that
        torch.cuda.reset_peak_memory_stats(device)


def fixed_bytes(cfg: Config, step: _ProbeStep, precision: Precision) -> int:
    """One rank's training state, and what FSDP gathers beside it, at the largest of the layouts its
    worlds may take (`engine.memory`)."""
    def at(world: int) -> int:
        layout = layout_for(cfg.parallelism, world)
        state = state_bytes_estimate(step.num_params, layout, replicated=replicated(cfg), precision=precision.name,
                                     optimizer=cfg.train.optimizer.name, momentum=cfg.train.optimizer.momentum,
                                     stage_params=step.stage_params)
        return state.total + gathered_bytes(step.largest_unit, layout, precision.name)
    return max(at(w) for w in cfg.worlds)


def held_samples(cfg: Config, dp_sizes: list[int], step: _ProbeStep, samples: int) -> Callable[[int], float]:
    """Samples' worth of whole-model activations a rank holds at its peak, by micro-batch size, at the
    largest share its worlds give a data-parallel rank (`ParallelismConfig.activation_samples`), under a
    pipeline by the share of them each stage was counted to hold (`_ProbeStep.stage_shares`)."""
    return cfg.parallelism.activation_samples(cfg.train.global_batch_size // min(dp_sizes), step.stage_shares(samples))


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


def tensor_split(cfg: Config, model: torch.nn.Module) -> TensorSplit | None:
    """What one tensor-parallel rank holds of the activations the probe counts on a whole copy, under the
    built-in gpt's plan (`tp.whole_activations`; the logits stay split for language modeling with
    `loss_parallel`, as the attempt builds it). None without TP, and for a model with its own plan:
    counted whole, at most `tensor` x what a rank holds."""
    whole = whole_activations(model, cfg.parallelism.loss_parallel and cfg.task == "language_modeling") \
        if cfg.parallelism.tensor > 1 else None
    if whole is None:
        return None
    names, after = whole
    return TensorSplit(cfg.parallelism.tensor, tuple(model.get_submodule(n) for n in names),
                       model.get_submodule(after) if after else None)


def replicated(cfg: Config) -> bool:
    """Plain DDP: every rank holds the whole model, with DDP's gradient buckets."""
    return cfg.parallelism.strategy == "ddp" and cfg.parallelism.model_parallel == 1


class _ProbeStep:
    """Forward (and backward) passes of a bare copy of the model on this rank's device, on the run's
    first rows, in the run's precision: no process group, nothing the engine holds. `fake`: the copy and
    the rows are fake tensors (`engine.memory.fake_tensors`), which hold no memory."""

    def __init__(self, cfg: Config, task, data: ShardedData, device: torch.device, precision: Precision, *,
                 fake: bool):
        self.task, self.data, self.device, self.precision, self.fake = task, data, device, precision, fake
        self.parallelism = cfg.parallelism
        self.mode = fake_tensors() if fake else contextlib.nullcontext()
        with self.mode, device:
            self.model = build_model(cfg.model.name, cfg.model.kwargs).train()
        apply_activation_checkpointing(self.model, cfg.parallelism.activation_checkpointing)  # as the engine does
        self.split = tensor_split(cfg, self.model)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        p = cfg.parallelism
        self.stage_params = max(pipeline_rank_params(self.model, p.pipeline, p.pipeline_split, p.stages_per_rank)) \
            if p.pipeline > 1 else None
        """The most parameters one pipeline rank holds (its blocks and ends), before TP or FSDP split them."""
        blocks = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(self.model)]
        self.largest_unit = max(blocks + [self.num_params - sum(blocks)])
        """The parameters of the largest `fully_shard` unit: a transformer block, or what the root holds."""
        self.warm = device.type != "cuda"

    def to(self, device: torch.device) -> None:
        """Move the (real) copy to `device`; on a GPU the next measure first runs a pass unmeasured."""
        self.model, self.device = self.model.to(device), device
        self.warm = device.type != "cuda"

    def _rows(self, m: int) -> dict[str, torch.Tensor]:
        """The run's first `m` rows, read outside the fake mode: tensors the data keeps must stay real."""
        return self.data.batch(np.arange(m))

    def _loss(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: (self.mode.from_tensor(v) if self.fake else v).to(self.device) for k, v in rows.items()}
        if self.precision.name == "fp32":
            return self.task.loss(self.model, batch)[0]
        with torch.autocast(self.device.type, dtype=self.precision.dtype):
            return self.task.loss(self.model, batch)[0]

    def _forward_backward(self, m: int) -> None:
        self._loss(self._rows(m)).backward()
        self.model.zero_grad(set_to_none=True)

    def activation_bytes(self, m: int) -> int:
        """The bytes of the tensors saved for the backward (fake or on a CPU); on a GPU, the allocator's
        peak over a forward and backward."""
        if self.fake or self.device.type != "cuda":
            rows = self._rows(m)
            with self.mode:
                return saved_activation_bytes(lambda: self._loss(rows), self.model.parameters(), self.split) + \
                    self._recomputed_bytes(rows)
        if not self.warm:  # the first pass allocates workspaces once: keep them out of the measure
            self._forward_backward(m)
            self.warm = True
        return cuda_peak_bytes(lambda: self._forward_backward(m), self.device)

    def stage_shares(self, m: int) -> list[float] | None:
        """Under a pipeline, each stage's share of one micro-batch's activations, counted at `m` rows as
        `activation_bytes` counts them on fake tensors or a CPU (saved for the backward): its blocks', the
        first stage's ends', for the last all that is saved outside both (its norm, head, logits and the
        loss), and for the others the output they keep for their backward. None without a pipeline."""
        p = self.parallelism
        if p.pipeline == 1:
            return None
        blocks = list(self.model.blocks.values())
        firsts = [self.model.get_submodule(name) for name in pipeline_ends(self.model)[0]]
        inputs = [0] * len(blocks)  # a stage's output is the next one's input: the gpt's is split under TP
        size = self.split.size if self.split is not None else 1

        def seen(i: int, args) -> None:
            inputs[i] = args[0].numel() * args[0].element_size() // size if args and torch.is_tensor(args[0]) else 0
        hooks = [b.register_forward_pre_hook(lambda _, args, i=i: seen(i, args)) for i, b in enumerate(blocks)]
        rows = self._rows(m)
        try:
            with self.mode:
                parts, rest = part_activation_bytes(lambda: self._loss(rows), self.model.parameters(),
                                                    blocks + firsts, self.split)
        finally:
            for h in hooks:
                h.remove()
        return stage_activation_shares(parts[:len(blocks)], sum(parts[len(blocks):]), rest,
                                       p.pipeline * p.stages_per_rank, p.pipeline_split, inputs)

    def _recomputed_bytes(self, rows: dict[str, torch.Tensor]) -> int:
        """What the backward holds beyond the forward's saved tensors: the activations of the largest block
        with activation checkpointing, recomputed (0 without). The forward saves only such a block's input."""
        blocks = [b for b in transformer_blocks(self.model) if getattr(b, "checkpointed", False)]
        if not blocks:
            return 0
        for b in blocks:
            b.checkpointed = False
        try:
            return max(part_activation_bytes(lambda: self._loss(rows), self.model.parameters(), blocks, self.split)[0])
        finally:
            for b in blocks:
                b.checkpointed = True

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
