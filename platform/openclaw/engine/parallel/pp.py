"""Pipeline parallelism for the built-in gpt and models shaped like it (`layout_checks.PIPELINE_PROTOCOL`:
blocks in an nn.ModuleDict, `pipeline_ends`) (plain torch; worker process): consecutive blocks on
consecutive ranks of a pipeline group, micro-batches flowing through them on torch's schedules (1F1B,
GPipe, interleaved 1F1B), composed with tensor parallelism within each stage and FSDP over the
data-parallel ranks (torchtitan's 3-D order: the stages are cut, each stage's part is split over its
tensor-parallel ranks, then sharded).

Every rank keeps its stages' parts of the model (its blocks; what `pipeline_ends` names for the first
stage, the gpt's embeddings, on the first; the final norm and the head on the last) and drops the
rest, so parameter names, and checkpoints, are those of the whole model. With interleaved 1F1B a rank
holds two stages, `pipeline` apart, in one pruned model (the gpt's forward runs either; a user's model
runs seeing only one stage's blocks and ends, `pp_stage.StageView`).

A parameter tied between the first and the last stage (the gpt's embedding and head) has a copy on
each. After the backward their gradients are summed across the two ranks, so both copies get the same
update and stay equal. The global gradient norm sums every stage's squares (the copy counted once).
The loss is computed on the last stage (the task's `output_loss`, scaled as the engine scales it) and
broadcast to the group, so every rank reports it. The buffers a checkpoint keeps (BatchNorm's) are
each stage's data-parallel rank 0's after every step (`fsdp.sync_buffers`). What a rank waits for between its chunks (its
neighbours' transfers, the bubble, those collectives) is its step's communication (`pp_wait`).

Under tensor parallelism the ranks of a pipeline group share their tensor-parallel position, so each
passes the next stage its own slice of the sequence (the sequence-parallel layout between blocks) as
a plain tensor, and the split embedding and head hold the same rows of the tied matrix. The last
stage's logits leave the stage as each rank's slice of the vocabulary under `loss_parallel` and are
split again for the loss (`tp.loss_context`), or whole.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from openclaw.engine.models import GPT
from openclaw.engine.parallel.base import (Batch, CommClock, StepFns, apply_activation_checkpointing,
                                           as_many_as_any_rank, on_meta, place)
from openclaw.engine.parallel.clip import clip_global
from openclaw.engine.parallel.fsdp import ShardedState, dp_mesh, kept_buffers, shard, sync_buffers
from openclaw.engine.parallel.fsdp_comm import time_collectives
from openclaw.engine.parallel.layout_checks import NEEDS_BUILTIN_TASK, check_pipeline, pipeline_ends, stage_blocks
from openclaw.engine.parallel.mesh import MeshLayout
from openclaw.engine.parallel.pp_stage import (StageView, agree_on_overflow, chunk_seeds, cross_stage_ties,
                                               from_slices, held_plan, rechunk)
from openclaw.engine.parallel.pp_wait import WaitingStage, computing
from openclaw.engine.parallel.tp import (
    apply_tensor_parallel,
    check_ties_alike,
    checked_plan,
    loss_context,
    split_of,
    whole_loss,
)
from openclaw.errors import ConfigError

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}


class PipelineStrategy(ShardedState):
    name = "pipeline"

    def __init__(self, layout: MeshLayout, mesh: DeviceMesh, rank: int, *, schedule: str = "1f1b",
                 microbatches: int | str = "auto", reshard_after_forward: bool = True,
                 activation_checkpointing: str = "none", param_dtype: torch.dtype | None = None,
                 always_shard: bool = True, loss_parallel: bool = False, split: list[int] | None = None):
        """`loss_parallel`: under tensor parallelism the last stage's logits stay split (`tp.gpt_plan`).
        `split`: blocks per stage (`parallelism.pipeline_split`; None: as even as can be)."""
        self.layout, self.mesh, self.rank, self.always_shard = layout, mesh, rank, always_shard
        self.pp, self.pp_rank = layout.pipeline, layout.coords(rank)["pp"]
        self.schedule_name, self.microbatches, self.split = schedule, microbatches, split
        self.reshard_after_forward, self.ac, self.param_dtype = reshard_after_forward, activation_checkpointing, param_dtype
        self.stages = self.pp * (2 if schedule == "interleaved_1f1b" else 1)
        self.my_stages = list(range(self.pp_rank, self.stages, self.pp))
        self.group = mesh["pp"].get_group()
        self.last_rank = layout.group("pp", rank)[-1]  # the global rank of this group's last stage
        self.tied_group = None  # the first and last stages' ranks (every rank takes part in making each pair)
        for ranks in layout.groups("pp"):
            pair = dist.new_group([ranks[0], ranks[-1]])
            if rank in (ranks[0], ranks[-1]):
                self.tied_group = pair
        self.loss_parallel, self.split_logits, self._vocab = loss_parallel, False, 0
        self._mb_rows = self._mb_count = 0
        self._eval_totals: dict[str, float] = {}
        self._evaluating = False
        self._schedules: dict[Any, Any] = {}
        self._views: list[WaitingStage] = []
        self.comm: CommClock | None = None
        self._parts: list[StageView] = []
        self._tied: list[nn.Parameter] = []
        self._copies: list[nn.Parameter] = []
        self._kept: set[str] = set()
        self._dp: DeviceMesh | None = None

    # ---- building the stages ------------------------------------------------------------------

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        check_pipeline(model, self.stages, split=self.split)
        bounds = stage_blocks(len(model.blocks), self.stages, self.split)
        keys = list(model.blocks)
        keep = {keys[b] for s in self.my_stages for b in bounds[s]}
        first, last = 0 in self.my_stages, self.stages - 1 in self.my_stages
        ties = cross_stage_ties(model)
        part = copy.deepcopy(model)  # on the host: only this rank's stages reach the device, below
        for key in [k for k in part.blocks if k not in keep]:
            del part.blocks[key]
        starts, ends = pipeline_ends(model)
        for name, held in [(m, first) for m in starts] + [(m, last) for m in ends]:
            if not held:
                parent, _, attr = name.rpartition(".")
                setattr(part.get_submodule(parent) if parent else part, attr, None)
        tp = self.mesh["tp"] if self.layout.tensor > 1 else None
        if tp is not None:  # each parameter placed as it is split
            plan = None if isinstance(model, GPT) else held_plan(checked_plan(model, model.parallelize_plan(tp)), part)
            self.split_logits = apply_tensor_parallel(part, tp, self.loss_parallel, plan)
            self._check_ties_alike(part, ties, first)
        self._vocab = part.head.weight.shape[0] if self.split_logits and last else 0
        apply_activation_checkpointing(part, self.ac)
        dp = dp_mesh(self.layout, self.mesh, self.always_shard)
        self._kept, self._dp = kept_buffers(part), dp  # synced across the stage's replicas after each step
        if dp is None:
            part = place(part, device)
        else:  # `fully_shard` places each block's shard (new parameter objects: the tied ones are looked up after)
            shard(part, dp, self.reshard_after_forward, self.param_dtype)
            if on_meta(part):
                place(part, device)
        self.comm = CommClock(device)  # the stages' waits (`pp_wait`); on a CPU FSDP's blocking collectives too
        if dp is not None and device.type == "cpu":
            time_collectives(part, self.comm, replicated=self.layout.replicate > 1)
        # each tie's two copies: summed after the backward; counted once in the norm (on the first stage)
        self._tied = [part.get_parameter(t[0]) for t in ties if first] + [part.get_parameter(t[1]) for t in ties if last]
        self._copies = [part.get_parameter(t[1]) for t in ties] if last and not first else []
        self._parts = [StageView(part, [keys[b] for b in bounds[s]], s == 0, s == self.stages - 1, tp)
                       for s in self.my_stages]
        self._views = [WaitingStage(view, s, self.stages, device, group=self.group)
                       for view, s in zip(self._parts, self.my_stages)]
        return part

    def _check_ties_alike(self, part: nn.Module, ties: list[tuple[str, str]], first: bool) -> None:
        """A tie between the first and last stages is split by each stage's own part of the plan: the two
        ranks exchange their placements of it (one small object each, once, at the wrap) and compare,
        since their gradients' slices are summed."""
        if ties and self.tied_group is not None:
            mine = [split_of(part.get_parameter(t[0] if first else t[1])) for t in ties]
            both: list[Any] = [None, None]
            dist.all_gather_object(both, (not first, mine), group=self.tied_group)
            (_, at_first), (_, at_last) = sorted(both)
            check_ties_alike(part, [(a, b, sa, sb) for (a, b), sa, sb in zip(ties, at_first, at_last)])

    def _schedule(self, n: int, fns: StepFns):
        """The training step's schedule for `n` micro-batches; its forward-only pass (`evaluate`) sums the
        task's validation sums instead of the loss."""
        if n not in self._schedules:
            def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                if self._evaluating:
                    return self._eval_sums(fns, output, target)
                with computing(self.comm):
                    return fns.scaler.scale(self._output_loss(fns, output, target) * fns.loss_scale)

            stages = self._views if self.schedule_name == "interleaved_1f1b" else self._views[0]
            self._schedules[n] = SCHEDULES[self.schedule_name](stages, n_microbatches=n, loss_fn=loss_fn,
                                                               scale_grads=False)
        return self._schedules[n]

    def _output_loss(self, fns: StepFns, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's loss of the last stage's output (run under `loss_context`, `_run`)."""
        return whole_loss(fns.task.output_loss(self._task_output(output), target))

    def _task_output(self, output: torch.Tensor) -> torch.Tensor:
        """The last stage's output as the task scores it: under loss parallelism, this rank's slice of the
        vocabulary split again."""
        return from_slices(output, self.mesh["tp"], output.dim() - 1, self._vocab) if self.split_logits else output

    # ---- the step -------------------------------------------------------------------------------

    def forward_backward(self, model: nn.Module, micro_batches: list[Batch],
                         fns: StepFns) -> tuple[list[torch.Tensor], int]:
        if not hasattr(fns.task, "output_loss"):
            raise ConfigError(NEEDS_BUILTIN_TASK)
        n = len(micro_batches) if self.microbatches == "auto" else int(self.microbatches)
        inputs, targets = fns.task.split(fns.to_device({k: torch.cat([b[k] for b in micro_batches])
                                                        for k in micro_batches[0]}))
        self._mb_rows, self._mb_count = len(inputs) // n, n  # the stages' buffers' shape: evaluation's too
        seeds = chunk_seeds(fns.seeds, len(next(iter(micro_batches[0].values()))), len(inputs), n)
        losses: list[torch.Tensor] = []
        try:
            for view in self._views:
                view.seeds = seeds
            with fns.autocast(cache=False):  # the stages reshard between micro-batches (`Engine.autocast`)
                self._run(self._schedule(n, fns), inputs, targets, losses)
        finally:
            for view in self._views:
                view.seeds = []
        scale = fns.loss_scale * (fns.scaler.get_scale() if fns.scaler.is_enabled() else 1.0)
        total = (torch.stack(losses).sum() / scale).detach() if losses else torch.zeros((), device=inputs.device)
        self._sum_tied_grads()
        sync_buffers(model, self._kept, self._dp)
        agree_on_overflow(model.parameters(), fns.scaler, self.group)
        loss = self._from_last_stage(total)
        self.comm.done()  # the step's closing collectives were waited on too
        return [loss], len(inputs)

    def _run(self, schedule, inputs: torch.Tensor, targets: torch.Tensor, losses: list, train: bool = True) -> None:
        """One pass of `schedule` over `inputs` (split into its micro-batches). The last stage's outputs are
        not kept for the caller (`return_outputs=False`): the loss function already took what it needs,
        and torch's default holds every micro-batch's output (a language model's logits) to the end of the
        pass, where 1F1B frees each one after its backward."""
        run = schedule.step if train else schedule.eval
        args = (inputs,) if 0 in self.my_stages else ()
        for part, view in zip(self._parts, self._views):
            part.seq, view.clock = inputs.shape[1], self.comm if train else None
        if train:
            self.comm.launched()  # waiting until the first chunk computes
        with loss_context(self.split_logits):  # the backward of a split loss too
            if self.stages - 1 in self.my_stages:
                run(*args, target=targets, losses=losses, return_outputs=False)
            else:
                run(*args, return_outputs=False)

    def _sum_tied_grads(self) -> None:
        """The embedding's gradient from the first stage plus the head's from the last, on both. Under
        tensor parallelism the embedding's backward leaves its gradient whole (`Replicate`): each rank
        keeps its rows first, as the head's is split, so both sum the same slice."""
        for p in self._tied:
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            dist.all_reduce(grad, group=self.tied_group)

    def _from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        value = value.float().clone()
        dist.broadcast(value, src=self.last_rank, group=self.group)
        return value

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        return clip_global(model.parameters(), max_norm, sum_over=[self.group], exclude=self._copies)

    def evaluate(self, model: nn.Module, batches, fns: StepFns) -> dict[str, float]:
        """Forward only through the stages, on the training step's own schedule: training-sized
        micro-batches (the stages' buffers have that shape), as many per pass as a step has, so that the
        stages overlap as in training; the last pass is padded with rows whose targets are ignored.

        The same schedule, not one of its own, because a schedule sets up the stages' receive buffers
        once, and the stages are shared: a separate forward-only schedule remade the buffers of the
        micro-batches it ran without gradients, and the training schedule kept using them, so the earlier
        stages lost those micro-batches' gradients at every later step (a run that evaluated trained
        another model than one that did not). torch's schedule notices its own switch between training
        and evaluation and sets the buffers up again. Before any training step: one micro-batch per pass
        on GPipe's forward, which takes any count (1F1B refuses fewer micro-batches than stages).

        The last stage sums the task's `output_sums` (the loss; a classifier's correct predictions too)
        and sends them to the group, so every rank returns what evaluating the whole model returns. Data-
        parallel shares may differ by a pass: every rank runs as many as the one with the most (its stages
        may be FSDP's), the extra ones with every target ignored."""
        n = self._mb_count or 1
        schedule = self._schedule(n, fns) if self._mb_count else self._untrained_eval_schedule(fns)
        self._eval_totals, count, self._evaluating = {}, 0, True
        try:
            passes = rechunk(batches, fns, self._mb_rows or None, n)
            for (inputs, targets, real), counted in as_many_as_any_rank(passes, next(model.parameters()).device):
                targets, real = (targets, real) if counted else (torch.full_like(targets, -100), 0)
                with fns.autocast(cache=False):
                    self._run(schedule, inputs, targets, [], train=False)
                count += real
        finally:
            self._evaluating = False
        totals = [self._eval_totals]
        dist.broadcast_object_list(totals, src=self.last_rank, group=self.group)
        return {**totals[0], "count": count}

    def _eval_sums(self, fns: StepFns, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The eval schedule's loss function: adds the micro-batch's `output_sums` up, returns its loss."""
        sums = {k: whole_loss(v) for k, v in fns.task.output_sums(self._task_output(output), target).items()}
        for k, v in sums.items():
            self._eval_totals[k] = self._eval_totals.get(k, 0.0) + v.float().item()
        return sums["loss"]

    def _untrained_eval_schedule(self, fns: StepFns):
        """GPipe's, one micro-batch per pass: an evaluation before any training step (see `evaluate`)."""
        if "eval" not in self._schedules:
            stages = self._views if self.schedule_name == "interleaved_1f1b" else self._views[0]
            name = "gpipe" if self.schedule_name == "1f1b" else self.schedule_name
            self._schedules["eval"] = SCHEDULES[name](
                stages, n_microbatches=1, loss_fn=lambda o, t: self._eval_sums(fns, o, t), scale_grads=False)
        return self._schedules["eval"]

    def take_comm_s(self) -> float | None:
        return self.comm.take() if self.comm else None

    def local_grad(self) -> None:
        # the schedule runs every micro-batch's backward in one call: no gradient of part of the batch
        return None

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model
