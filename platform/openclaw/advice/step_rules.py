"""The rules that read where a step's time goes (pure; see `openclaw.advice.rules`): data wait, data
preparation, exposed communication, stragglers, checkpoint stalls and micro-batches too small for their
overhead. Each is `rule(facts) -> Recommendation | None`, quiet when its fix is in place or its fact
was not measured."""
from __future__ import annotations

import math
import os
import statistics

from openclaw.advice import batching
from openclaw.advice.layout_rules import stage_ranks
from openclaw.advice.measured import Facts, Recommendation

DATA_WAIT_FRAC = 0.05
"""The step waits on data for more than this share of its time."""
READ_SHARE = 0.5
"""Over this part of the data wait went to shard reads the reader thread had not finished."""
PREPARE_FRAC = 0.05
"""Preparing the data took more than this share of the run's wall time."""
COMM_FRAC = 0.10
"""Exposed collective wait over this share of the step."""
BUCKETS = 4
"""Buckets a suggested `parallelism.bucket_cap_mb` splits DDP's all-reduce into: the backward can hide all
but the last."""
MIN_BUCKET_MB = 1.0
"""Below about this size a bucket's all-reduce costs its launch more than its bytes: smaller buckets would
hide nothing."""
STRAGGLER_INDEX = 1.2
"""The slowest rank's busy time over the median rank's."""
CHECKPOINT_FRAC = 0.05
"""Checkpoint stalls over this share of the step."""
CHECKPOINT_TARGET_FRAC = 0.02
"""The share a suggested `checkpoint.every_steps` aims at."""
WRITE_BYTES_PER_S = 1e9
"""An assumed write rate (bytes/s) of checkpoint storage. A stall per checkpoint far longer than writing
its bytes at this rate would take is the fixed cost of reporting a checkpoint (Ray Train's), which
a background write does not hide and only saving less often cuts."""
MICRO_BATCH_MIN_S = 0.002
"""A micro-batch whose forward and backward compute in less than this is dominated by the fixed cost of
each call (Python, kernel launches, the batch gather), not by its samples."""


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _speedup(frac_removed: float) -> float:
    return 1.0 / max(1e-9, 1.0 - frac_removed)


def rule_data_wait(f: Facts) -> Recommendation | None:
    """`data_wait_frac` over 5%. Mostly shard reads (`read_share` over half): more CPUs per worker for
    its reader thread. Otherwise the gathers of micro-batches: fewer, larger ones; quiet when each worker
    already gathers its whole step's batch at once, or the micro-batch is `auto`."""
    frac, cfg = f.data_wait_frac, f.config
    if frac is None or frac <= DATA_WAIT_FRAC:
        return None
    if f.read_share is not None and f.read_share > READ_SHARE:
        cpus = cfg.scaling.resources_per_worker.get("CPU", 1)
        return Recommendation(
            "data_wait", f"the step waits on data for {_pct(frac)} of its time, {_pct(f.read_share)} of that "
            f"for shards the reader thread had not read ahead", "scaling.resources_per_worker.CPU",
            int(cpus) + 1, f"reads that keep ahead of the steps: up to {_speedup(frac):.2f}x samples/s", frac)
    micro = batching.fixed_micro(cfg)
    bigger = batching.larger_micro(cfg, 2 * micro) if micro else None
    if bigger is None:
        return None
    return Recommendation(
        "data_wait", f"the step waits on data for {_pct(frac)} of its time, gathering "
        f"{batching.accumulation(cfg, f.world_size)} micro-batches of {micro} per step",
        "train.micro_batch_size", bigger,
        f"{micro / bigger:.2g}x the gathers per step: up to {_speedup(frac * (1 - micro / bigger)):.2f}x "
        f"samples/s", frac)


def rule_data_preparation(f: Facts) -> Recommendation | None:
    """Preparing the data (`data.transforms`) took over 5% of the run's wall time on a cache miss, and the
    cache lives in this run's `checkpoint.storage` (`data.cache.dir` unset), where only runs with the
    same storage find it: pin `data.cache.dir` to the folder it was prepared in, so that every later run
    with the same data, transforms and code skips the preparation. Quiet on a hit or with it set."""
    cfg = f.config
    if f.prepare_cache != "miss" or not f.prepare_s or not f.wall_s or cfg.data.cache.dir:
        return None
    share = f.prepare_s / f.wall_s
    if share <= PREPARE_FRAC:
        return None
    # the folder the run recorded; a run that recorded none: its storage's, seen from here
    folder = f.prepare_dir or os.path.join(os.path.abspath(cfg.checkpoint.storage), ".data-cache")
    return Recommendation(
        "data_preparation", f"preparing the data (`data.transforms`, a cache miss) took {f.prepare_s:.1f} s, "
        f"{_pct(share)} of the run's {f.wall_s:.0f} s", "data.cache.dir", folder,
        f"a run with the same data, transforms and transform code, whatever its `checkpoint.storage`, finds "
        f"the prepared data there and starts about {f.prepare_s:.1f} s sooner", share)


def rule_exposed_comm(f: Facts) -> Recommendation | None:
    """`comm_frac` over 10% with more than one worker, and no straggler to blame (`rule_straggler` speaks
    then: the others' wait is for it). FSDP: keep the gathered parameters (`reshard_after_forward:
    false`), then fewer, larger micro-batches (FSDP gathers per micro-batch). DDP: where its gradients
    (`grad_bytes`) fill at most two buckets, smaller buckets, so that the backward hides all but the
    last all-reduce and the optimization stays the same; else (DDP all-reduces once per step) a larger
    global batch carries that cost over more samples (its LR by `elastic.lr_rule`). Quiet under a
    pipeline: its stages' wait is mostly the schedule's filling and draining (`pipeline_bubble`)."""
    frac, cfg = f.comm_frac, f.config
    if frac is None or frac <= COMM_FRAC or (f.world_size or cfg.scaling.max_workers) < 2:
        return None
    if cfg.parallelism.pipeline > 1:
        return None
    if f.straggler_index is not None and f.straggler_index > STRAGGLER_INDEX:
        return None
    finding = f"the step waits {_pct(frac)} of its time on collectives its compute does not hide"
    p = cfg.parallelism
    if p.strategy == "fsdp" and p.reshard_after_forward:
        return Recommendation("exposed_comm", finding, "parallelism.reshard_after_forward", False,
                              f"one all-gather per block and micro-batch fewer (of FSDP's three): up to "
                              f"{_speedup(frac / 3):.2f}x samples/s, for one block's parameters more memory", frac)
    micro = batching.fixed_micro(cfg)
    if p.strategy == "fsdp" and micro:
        bigger = batching.larger_micro(cfg, batching.per_worker_batch(cfg))
        if bigger:
            return Recommendation("exposed_comm", finding, "train.micro_batch_size", bigger,
                                  f"{micro / bigger:.2g}x the collectives per step: up to "
                                  f"{_speedup(frac * (1 - micro / bigger)):.2f}x samples/s", frac)
    if p.strategy == "ddp" and p.model_parallel == 1 and f.grad_bytes:
        grad_mb = f.grad_bytes / 2**20
        cap = round(grad_mb / BUCKETS, 1)
        if cap >= MIN_BUCKET_MB and p.bucket_cap_mb > grad_mb / 2:
            return Recommendation("exposed_comm", finding, "parallelism.bucket_cap_mb", cap,
                                  f"its {grad_mb:.0f} MB of gradients go in {BUCKETS} all-reduces instead of "
                                  f"{math.ceil(grad_mb / p.bucket_cap_mb)}, and the backward can hide all but the "
                                  f"last: up to {_speedup(frac * (1 - 1 / BUCKETS)):.2f}x samples/s, the "
                                  f"optimization unchanged", frac)
    new = batching.global_batch_near(cfg, 2 * cfg.train.global_batch_size)
    return Recommendation("exposed_comm", finding, "train.global_batch_size", new,
                          f"each all-reduce carries {new / cfg.train.global_batch_size:.2g}x the samples: up to "
                          f"{_speedup(frac * (1 - cfg.train.global_batch_size / new)):.2f}x samples/s; set "
                          f"`train.optimizer.lr` to {batching.scaled_lr(cfg, new):.3g} (`elastic.lr_rule`: "
                          f"{cfg.elastic.lr_rule})", frac)


def rule_straggler(f: Facts) -> Recommendation | None:
    """`straggler_index` over 1.2: one rank's busy time stands out, and every collective waits for it. The
    fix is that rank's node (its load, its device), not a key. Under a pipeline, whose stages differ in
    work by design (the last one computes the head and the loss), a rank is compared with the ranks of
    its own stage, which do the same work (`rank_busy`; quiet where each stage has one rank)."""
    if f.config.parallelism.pipeline > 1:
        return _stage_straggler(f)
    index = f.straggler_index
    if index is None or index <= STRAGGLER_INDEX or (f.world_size or f.config.scaling.max_workers) < 2:
        return None
    rank = f"rank {f.slowest_rank}" if f.slowest_rank is not None else "the slowest rank"
    return _straggler(f"{rank} is busy {index:.2f}x as long per step as the median rank, and the others wait for it",
                      index)


def _stage_straggler(f: Facts) -> Recommendation | None:
    """The rank busiest against the median of its pipeline stage's ranks, over 1.2x."""
    worst = None
    for stage, ranks in enumerate(stage_ranks(f) or []):
        median = statistics.median(f.rank_busy[r] for r in ranks)
        for r in ranks:
            index = f.rank_busy[r] / median if len(ranks) > 1 and median > 0 else 1.0
            if index > STRAGGLER_INDEX and (worst is None or index > worst[0]):
                worst = (index, r, stage)
    if worst is None:
        return None
    index, rank, stage = worst
    return _straggler(f"rank {rank} is busy {index:.2f}x as long per step as the median rank of pipeline stage "
                      f"{stage}, and the pipeline waits for it", index)


def _straggler(finding: str, index: float) -> Recommendation:
    return Recommendation("straggler", finding, None, None, f"without it the step is up to {_pct(1 - 1 / index)} "
                          f"shorter: look at what else runs on its node, or leave that node out", 1 - 1 / index)


def rule_checkpoint_stall(f: Facts) -> Recommendation | None:
    """Checkpoint stalls over 5% of the step. When writing the checkpoint's bytes would take a good part
    of the stall (at `WRITE_BYTES_PER_S`), saves are synchronous, the steps between two checkpoints
    compute for longer than a save stalls (the background write has them to hide behind; else the next
    snapshot waits for it), and the worker has a CPU its steps leave free (`_cpu_to_spare`):
    `checkpoint.async`. Otherwise save less often, to about 2% of the step."""
    frac, cfg = f.checkpoint_frac, f.config
    if frac is None or frac <= CHECKPOINT_FRAC:
        return None
    every = cfg.checkpoint.every_steps
    stall = _stall_per_checkpoint(f)
    finding = f"checkpoint stalls take {_pct(frac)} of the step: a checkpoint every {every} step(s)"
    finding += (f", {stall:.2f} s each" if stall else "") + (
        f" for {f.checkpoint_bytes / 1e6:.3g} MB" if f.checkpoint_bytes else "")
    between = None if f.step_s is None else every * f.step_s * (1 - frac)  # compute between two checkpoints
    if not cfg.checkpoint.async_ and f.checkpoint_bytes and _cpu_to_spare(f) and (stall is None or (
            f.checkpoint_bytes / WRITE_BYTES_PER_S > stall / 2 and stall < between)):
        return Recommendation("checkpoint_stall", finding, "checkpoint.async", True,
                              f"training stalls only for the snapshot to host memory: up to {_speedup(frac):.2f}x "
                              f"perf/samples_per_s", frac)
    target = every * (frac / (1 - frac)) * ((1 - CHECKPOINT_TARGET_FRAC) / CHECKPOINT_TARGET_FRAC)
    new = _round_up_nicely(target)
    if new >= cfg.train.max_steps:  # the final checkpoint is always written, after the last window
        return Recommendation("checkpoint_stall", finding, "checkpoint.every_steps", cfg.train.max_steps,
                              f"only the final checkpoint: up to {_speedup(frac):.1f}x perf/samples_per_s; a "
                              f"failure repeats the run from its start", frac)
    share = frac / (frac + (1 - frac) * new / every)
    return Recommendation("checkpoint_stall", finding, "checkpoint.every_steps", new,
                          f"checkpoint stalls fall to about {_pct(share)} of the step: about "
                          f"{(1 - share) / (1 - frac):.1f}x perf/samples_per_s; a failure repeats up to {new} steps",
                          frac)


def _cpu_to_spare(f: Facts) -> bool:
    """Whether an async save's background thread (serializing, checksumming, writing) has a CPU to itself.
    A GPU worker's steps leave its CPUs mostly idle. A CPU worker's torch threads take every CPU it
    reserves unless `train.threads_per_worker` is lower, and then the thread slows the steps by about
    what the loop no longer waits: on 2 cores, async overhead per step over sync overhead came out
    1.02 and 2.05 in two runs of `python bench/checkpoint_stall.py --steps 40 --every 5 --hidden 3000
    --repeats 5 --budget-s 110` (one round each), while the loop's stall fell to a quarter."""
    if f.device_type != "cpu":
        return True
    cpus = f.config.scaling.resources_per_worker.get("CPU", 1)
    return f.config.train.intra_op_threads(cpus) < cpus


def _stall_per_checkpoint(f: Facts) -> float | None:
    if f.step_s is None:
        return None
    return f.checkpoint_frac * f.step_s * f.config.checkpoint.every_steps


def _round_up_nicely(x: float) -> int:
    """The next of 1, 2, 5, 10, 20, 50, ... at or above `x`."""
    exp = 10 ** max(0, math.floor(math.log10(max(1.0, x))))
    return next(int(m * exp) for m in (1, 2, 5, 10) if m * exp >= x)


def rule_small_micro_batch(f: Facts) -> Recommendation | None:
    """Micro-batches computing in under `MICRO_BATCH_MIN_S` with gradient accumulation: each call's fixed
    cost dominates. Fewer, larger micro-batches, up to the whole per-worker batch, as memory allows
    (activations grow with the micro-batch). Quiet without accumulation or with `auto`, and under pipeline
    parallelism, where fewer micro-batches idle the stages longer (`pipeline_bubble` weighs them)."""
    cfg, accum, micro = f.config, f.accumulation, batching.fixed_micro(f.config)
    if f.micro_batch_s is None or f.micro_batch_s >= MICRO_BATCH_MIN_S or not micro or not accum or accum < 2 \
            or cfg.parallelism.pipeline > 1:
        return None
    cap = float(batching.per_worker_batch(cfg))
    if f.device_type == "cuda" and f.peak_memory_bytes and f.memory_capacity_bytes:  # a CPU's peak is the process's
        held = f.state_bytes or 0.0
        cap = min(cap, micro * (0.8 * f.memory_capacity_bytes - held) / f.above_state())
    bigger = batching.larger_micro(cfg, cap)
    if bigger is None:
        return None
    new_accum = max(1, accum * micro // bigger)
    share = 1.0 - (f.checkpoint_frac or 0.0) - (f.comm_frac or 0.0) - (f.idle_frac or 0.0)  # data and compute
    return Recommendation(
        "small_micro_batch", f"each micro-batch of {micro} computes in {f.micro_batch_s * 1e3:.2f} ms, and a step "
        f"runs {accum} of them per worker: their fixed per-call cost dominates", "train.micro_batch_size", bigger,
        f"{new_accum} micro-batch(es) per step instead of {accum}: up to {accum / new_accum:.0f}x fewer calls, "
        f"samples/s up by at most {accum / new_accum:.0f}x", share * (1 - new_accum / accum))
