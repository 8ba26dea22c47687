"""The `parallelism:` config section: how the model is spread over the workers (foundation: pydantic
only). See `openclaw.engine.parallel` for what each strategy does."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from pydantic import Field, model_validator

from openclaw.section import Section


PER_STAGE = 4
"""Pipeline micro-batches per stage that `train.micro_batch_size: auto` aims at, and the `pipeline_bubble`
advice suggests: GPipe's paper found the bubble negligible from 4 per stage."""


def common_sizes(shares: list[int], count_ok: Callable[[int], bool] = lambda n: True) -> list[int]:
    """Every size (ascending) that divides each of `shares` (the divisors of their greatest common divisor)
    into a count of pieces `count_ok` takes: micro-batch sizes of data-parallel shares, or counts."""
    g = math.gcd(*shares)
    return [d for d in range(1, g + 1) if g % d == 0 and all(count_ok(s // d) for s in shares)]


class ParallelismConfig(Section):
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: every worker holds the whole model, its gradients and its optimizer state (PyTorch's
    DistributedDataParallel). `fsdp`: each of them is sharded over the data-parallel workers (FSDP2's
    `fully_shard`, per transformer block and at the root), so a worker holds about 1/N of them."""
    replicate: int = Field(1, gt=0)
    """With `fsdp` and above 1: hybrid sharding (HSDP). The data-parallel workers form `replicate` groups;
    the model is sharded within each group and replicated across them (a 2-D mesh, replicate x shard)."""
    tensor: int = Field(1, gt=0)
    """Tensor-parallel degree: each of the built-in gpt's attention and MLP matrices is split over this
    many workers (column-wise, then row-wise). A user's model opts in by exporting
    `parallelize_plan(mesh)`. Fixed for the run: elastic resizes change only the data-parallel degree."""
    loss_parallel: bool = True
    """With `tensor` above 1, the built-in gpt and `task: language_modeling`: the output head keeps its
    logits split by vocabulary over the tensor-parallel ranks, and the cross-entropy is computed on the
    split logits (torch's `loss_parallel`). Each rank then holds 1/tensor of the logits (batch x sequence
    x vocabulary, the largest activation of a large-vocabulary model), and the forward exchanges a few
    numbers per token instead of gathering the logits whole. `false` gathers them (a user's loss function
    always gets them whole). The losses agree to float32 rounding either way."""
    pipeline: int = Field(1, gt=0)
    """Pipeline stages: the model's blocks are split into this many consecutive stages, one per worker of
    a pipeline group (the built-in gpt, or a model with its blocks in an `nn.ModuleDict` and a
    `pipeline_ends` attribute naming what runs before and after them). With `tensor` above 1 each
    stage is split over `tensor` workers too (pipeline x tensor workers hold one copy of the model).
    Fixed for the run, like `tensor`."""
    pipeline_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    """How micro-batches flow through the stages. `interleaved_1f1b` gives each worker two stages.
    Evaluation, forward only, runs on the training step's own schedule, in training-sized micro-batches;
    before the first training step, one micro-batch at a time (under `1f1b` on GPipe's: 1F1B refuses
    fewer micro-batches than stages)."""
    pipeline_split: list[int] | None = None
    """Blocks per pipeline stage, first to last (`pipeline` numbers; under `interleaved_1f1b`, twice as
    many), e.g. `[5, 3]`: fewer blocks on a stage that does more besides them (the last computes the
    head and the loss, the first the embeddings). They must add up to the model's blocks (checked
    before any worker starts). Default: as even as the blocks allow, earlier stages one more. May change
    when a run resumes: checkpoints hold the whole model's names."""
    microbatches: int | Literal["auto"] = "auto"
    """Pipeline micro-batches per optimizer step and data-parallel rank. `auto`: the gradient
    accumulation (each micro-batch of `train.micro_batch_size` samples is one pipeline micro-batch)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in the backward pass instead of keeping them: `full` for every transformer
    block, `selective` for every other block (about half the memory saving for half the recompute)."""
    reshard_after_forward: bool = True
    """`fsdp`: free each block's gathered parameters after its forward (all-gather them again for the
    backward). `false` keeps them, trading memory for one all-gather per block and step."""
    bucket_cap_mb: float = Field(25.0, gt=0)
    """`ddp`: the gradients are all-reduced in buckets of about this many MB, each launched as soon as its
    gradients are ready, so all but the last overlap the rest of the backward. Smaller buckets hide more of
    the all-reduce and launch more of them. PyTorch's default, 25."""

    @model_validator(mode="after")
    def _combinations(self) -> "ParallelismConfig":
        if self.replicate > 1 and self.strategy != "fsdp":
            raise ValueError(f"`parallelism.replicate` ({self.replicate}) shards within groups and replicates "
                             f"across them: it needs `parallelism.strategy: fsdp`")
        if isinstance(self.microbatches, int) and self.microbatches < 1:
            raise ValueError(f"`parallelism.microbatches` must be `auto` or at least 1, got {self.microbatches}")
        split, stages = self.pipeline_split, self.pipeline * self.stages_per_rank
        if split is not None and self.pipeline > 1 and (len(split) != stages or min(split) < 1):
            raise ValueError(f"`parallelism.pipeline_split` needs {stages} block counts of at least 1 (one per "
                             f"stage: `pipeline` {self.pipeline}, {self.pipeline_schedule}), got {split}")
        return self

    def unused_settings(self) -> list[str]:
        """The keys set away from their defaults that this layout makes no use of, each as a sentence to
        print before the run starts. Not errors: a sweep may try such a key beside a layout it does not
        apply to, and the run is the same with or without it."""
        plain_ddp = self.strategy == "ddp" and self.model_parallel == 1
        unused = [("bucket_cap_mb", self.bucket_cap_mb != 25.0 and not plain_ddp,
                   "to DDP's gradient buckets (`strategy: ddp` without `tensor` or `pipeline`)"),
                  ("reshard_after_forward", not self.reshard_after_forward and plain_ddp,
                   "to sharded parameters (`strategy: fsdp`, `tensor` or `pipeline` above 1)"),
                  ("loss_parallel", not self.loss_parallel and self.tensor == 1, "with `tensor` above 1"),
                  ("pipeline_schedule", self.pipeline_schedule != "1f1b" and self.pipeline == 1,
                   "with `pipeline` above 1"),
                  ("microbatches", self.microbatches != "auto" and self.pipeline == 1, "with `pipeline` above 1"),
                  ("pipeline_split", self.pipeline_split is not None and self.pipeline == 1,
                   "with `pipeline` above 1")]
        def shown(value) -> str:
            return str(value).lower() if isinstance(value, bool) else str(value)
        return [f"`parallelism.{key}` ({shown(getattr(self, key))}) applies only {where}; "
                f"this run makes no use of it." for key, applies_not, where in unused if applies_not]

    @property
    def world_unit(self) -> int:
        """Workers of one whole layout: every world size is a multiple (replicate x tensor x pipeline)."""
        return self.replicate * self.model_parallel

    def worlds(self, min_workers: int, max_workers: int) -> list[int]:
        """The world sizes an elastic run takes from `min_workers` to `max_workers`: the multiples of
        `world_unit`. Ray Train's elastic policy, which would start any count that fits, is rounded down to
        one of these (`mesh.whole_layouts`)."""
        return [w for w in range(min_workers, max_workers + 1) if w % self.world_unit == 0]

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pipeline rank runs: two under `interleaved_1f1b`, else one."""
        return 2 if self.pipeline_schedule == "interleaved_1f1b" else 1

    @property
    def model_parallel(self) -> int:
        """Workers that hold one copy of the model between them: tensor x pipeline."""
        return self.tensor * self.pipeline

    @property
    def sharded_state(self) -> bool:
        """Whether the strategy keeps the training state sharded (its checkpoints `sharded`): all but plain
        DDP, which `build_strategy` builds where `strategy: ddp` has no model parallelism."""
        return not (self.strategy == "ddp" and self.model_parallel == 1)

    def schedule_refuses(self, n: int) -> str | None:
        """Why torch's pipeline schedule refuses `n` micro-batches per step (None: it takes them). 1F1B needs
        at least one per pipeline rank; interleaved 1F1B runs them in rounds of `pipeline` and needs a
        whole number of rounds (`max(1, n // pipeline)` of them); GPipe takes any number."""
        if self.pipeline == 1:
            return None
        if self.pipeline_schedule == "1f1b" and n < self.pipeline:
            return f"1F1B needs at least {self.pipeline} micro-batches per step (one per pipeline stage), not {n}"
        rounds = max(1, n // self.pipeline)
        if self.pipeline_schedule == "interleaved_1f1b" and n % rounds:
            return (f"interleaved 1F1B runs micro-batches in rounds of {self.pipeline}, and {n} is not a whole "
                    f"number of its {rounds} rounds")
        return None

    def held_fraction(self, n: int, stage_shares: list[float] | None = None) -> float:
        """At the busiest pipeline rank's peak, the activations it holds over a step of `n` pipeline
        micro-batches, as a share of one micro-batch's through the whole model: over the ranks, the
        forwards it holds whose backward has not yet run (`in_flight`) times the largest share of its
        stages. `stage_shares`: each stage's share of the whole model's activations (the probe's count,
        where the last stage's logits and loss weigh in: `layout_checks.stage_activation_shares`); without
        them its share of the blocks (`pipeline_split`, or even). 1 with no pipeline."""
        if self.pipeline == 1:
            return 1.0
        weights = stage_shares or self.pipeline_split or [1] * (self.pipeline * self.stages_per_rank)
        return max(self.in_flight(n, r) * max(weights[r::self.pipeline]) for r in range(self.pipeline)) / sum(weights)

    def in_flight(self, n: int, rank: int) -> int:
        """The most micro-batch x stage forwards pipeline rank `rank` holds whose backward has not yet run,
        over a step of `n` micro-batches. GPipe runs every forward first (all `n`); 1F1B warms up one for
        each stage from its own to the last (`min(n, stages - rank)`: torch's `Schedule1F1B` runs the
        backward before the next forward); interleaved 1F1B `(v - 1) x round + 2 x (stages - 1 - rank)`
        forwards, then one more (torch's `_get_warmup_ops`, v stages per rank, rounds of
        `n // max(1, n // stages)`)."""
        stages, v = self.pipeline, self.stages_per_rank
        if self.pipeline_schedule == "gpipe":
            return n
        if self.pipeline_schedule == "1f1b":
            return min(n, stages - rank)
        per_round = n // max(1, n // stages)
        return min((v - 1) * per_round + 2 * (stages - 1 - rank) + 1, n * v)

    def activation_samples(self, share: int, stage_shares: list[float] | None = None) -> Callable[[int], float]:
        """For a data-parallel rank's `share` of the global batch: at a micro-batch size `m`, the samples'
        worth of whole-model activations the busiest rank holds at its peak. `m` itself without a
        pipeline; with one, the step's micro-batches run in one schedule, so it is the rows of a pipeline
        micro-batch times `held_fraction` of their count (`microbatches`, or under `auto` share / m), with
        the stages' measured `stage_shares` where given."""
        if self.pipeline == 1:
            return float

        def samples(m: int) -> float:
            n = self.microbatches if isinstance(self.microbatches, int) else share // m
            return share / n * self.held_fraction(n, stage_shares)
        return samples

    def count_suits(self, n: int) -> bool:
        """Whether a micro-batch size that splits a data-parallel rank's share into `n` micro-batches suits
        the pipeline schedule: under `microbatches: auto` they are the pipeline's micro-batches."""
        return isinstance(self.microbatches, int) or self.schedule_refuses(n) is None

    def auto_counts(self, global_batch: int, dp_sizes: list[int]) -> Callable[[int], bool]:
        """The micro-batch counts per data-parallel rank that `train.micro_batch_size: auto` may choose: those
        the schedule takes, and under `microbatches: auto` at least `PER_STAGE` per stage (the interleaved
        schedule's two stages per rank: half as many) where some size allows that, since fewer idle a
        pipeline's stages longer."""
        if self.pipeline == 1 or isinstance(self.microbatches, int):
            return self.count_suits

        def full(n: int) -> bool:
            return self.count_suits(n) and n * self.stages_per_rank >= PER_STAGE * self.pipeline
        return full if common_sizes([global_batch // dp for dp in dp_sizes], full) else self.count_suits

    def microbatches_per_step(self, share: int, micro_batch: int | str) -> int | None:
        """Pipeline micro-batches per step for a data-parallel rank's `share` of the global batch: the
        `microbatches` key, or under `auto` the accumulation (None while `train.micro_batch_size` is `auto`)."""
        if isinstance(self.microbatches, int):
            return self.microbatches
        return None if micro_batch == "auto" else share // int(micro_batch)
