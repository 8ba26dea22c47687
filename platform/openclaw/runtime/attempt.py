"""One attempt of a run on one worker (worker process): everything the training loop holds, built in
order (data, model and engine, restore), and the loop's actions that are more than a line: a training
step, acting on a non-finite decision, checkpointing, answering a stop. `runtime.loop` reads top to
bottom over these.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch

from openclaw.advice.batching import as_asked
from openclaw.advice.rules import placement_line
from openclaw.config import Config
from openclaw.constants import apply_secret_env
from openclaw.data.sampler import Sampler, check_same_order
from openclaw.engine.device import configure_process
from openclaw.engine.engine import Engine, StepStats, phase
from openclaw.engine.metrics import allgather_ints, now as perf_now
from openclaw.engine.initial_model import initial_model, rank0_weights
from openclaw.engine.parallel.base import transformer_blocks
from openclaw.engine.parallel.build import build_strategy, layout_for
from openclaw.engine.parallel.mesh import MeshLayout, nodes_spanned
from openclaw.engine.precision import choose_precision, device_facts, sharded_param_dtype
from openclaw.engine.state import TrainState, micro_batch_seed, seed_step
from openclaw.engine.tasks import build_task
from openclaw.errors import NonFiniteLossError, WorkerPreempted
from openclaw.profiling.capture import StepProfiler
from openclaw.runtime.log_window import LogWindow
from openclaw.runtime.setup import flops_per_sample, open_datasets
from openclaw.runtime.micro_batch import record_micro_batch, resolve_micro_batch
from openclaw.runtime.policies import BatchPlan, Fail, NonFiniteDecision, Rollback, batch_plan
from openclaw.runtime.precision_watch import PrecisionWatch, agree_on_precision
from openclaw.runtime.sample_log import SampleLog
from openclaw.runtime.checkpoint_store import prune, restore
from openclaw.runtime.compile_cache import CompileCache
from openclaw.runtime.inputs import LoopInputs
from openclaw.runtime.saver import Saver, should_save
from openclaw.runtime.stops import StopFlag, StopSignals, driver_control, install_in_ray_worker
from openclaw.tracking.tracker import NullTracker, make_tracker

log = logging.getLogger("openclaw")


class Attempt:
    def __init__(self, inputs: LoopInputs):
        # ---- set-up: the worker's place in the group and the mesh, its device, its tracker
        self.began, self.stepped = time.time(), False  # for the attempt's `first_step` event
        self.inputs, self.config = inputs, Config.model_validate(inputs.config)
        apply_secret_env(inputs.secrets)
        cfg, ctx = self.config, ray.train.get_context()
        self.world, self.rank = ctx.get_world_size(), ctx.get_world_rank()
        layout = layout_for(cfg.parallelism, self.world)  # samples are shared out over the data-parallel ranks
        self.dp, self.dp_rank = layout.dp, layout.dp_rank(self.rank)
        configure_process(cfg.train, int(cfg.scaling.resources_per_worker.get("CPU", 1)))
        self.device = ray.train.torch.get_device()
        self.tracker: NullTracker = make_tracker(self.rank, cfg.tracking.enabled, inputs.tracking, inputs.progress)
        # ---- data, then `train.micro_batch_size: auto` resolved on it: from here on the config holds a number
        self.train, self.val = open_datasets(inputs.data, cfg.data, pin=self.device.type == "cuda")
        cfg, self.micro_batch = resolve_micro_batch(cfg, device=self.device, world=self.world, run_dir=inputs.run_dir,
                                                    local_world=ctx.get_local_world_size(), data=self.train)
        self.config = cfg
        max_dp = cfg.scaling.max_workers // cfg.parallelism.model_parallel
        self.plan: BatchPlan = batch_plan(cfg.elastic.on_resize, cfg.elastic.lr_rule, cfg.train.global_batch_size,
                                          cfg.train.micro_batch_size, max_dp, self.dp)
        self.sampler = Sampler(len(self.train), self.plan.global_batch_size, cfg.train.micro_batch_size, cfg.seed,
                               self.dp, self.dp_rank, self.train.shard_rows(), cfg.data.shuffle_window_shards)
        # ---- model and engine, then the newest valid checkpoint
        self.engine = self._build_engine()
        self.state = TrainState(world_size=self.world, num_samples=len(self.train), seed=cfg.seed,
                                mlflow_run_id=inputs.run_id, shard_layout=self.sampler.order_layout())
        loaded = restore(inputs.run_dir, self.tracker, self.engine, self._check_resumable)
        if loaded:
            self._resume(loaded["state"])
        elif self.on_meta:  # a fresh start of a model built on the meta device: rank 0's initial weights
            self._initial_weights()
        self.precision = PrecisionWatch(self.engine, self.state, self.tracker, cfg.train, self.device)
        if self.engine.precision.name == "fp8":  # measured against bf16 on the first step, once per run
            first = self.sampler.split(self.sampler.global_batch_at(self.state.epoch, self.state.offset)[0])
            self.precision.settle_fp8(lambda: [self.train.batch(ids) for ids in first])
        self.compile_cache = self._open_compile_cache()
        if self.rank == 0:  # checkpoints Ray Train never registered count toward `checkpoint.keep` too
            prune(inputs.run_dir, cfg.checkpoint.keep, loaded["path"] if loaded else None)
        # ---- record how this attempt started (the tracking service names it start/resume/restart/resize)
        placement = self._placement(layout) if cfg.parallelism.tensor > 1 else {}
        self._record_attempt(layout, loaded["path"] if loaded else None, placement)
        self.state.world_size, self.state.attempt = self.world, self.state.attempt + 1
        self.precision.announce()  # after the attempt event: the run reads start, then precision
        self._advise_placement(placement)
        record_micro_batch(self.micro_batch, self.state, self.tracker)
        asked = as_asked(cfg, auto=self.micro_batch is not None)  # what the advice reads (its rules: quiet on `auto`)
        self.samples_log = self._sample_log(layout) if cfg.train.record_samples else None
        self.saver = Saver(self.engine, self.state, self.tracker, inputs.config, self.rank, inputs.run_dir,
                           background=cfg.checkpoint.async_)
        install_in_ray_worker()
        self.stops = StopSignals(self.device, **(driver_control(inputs.control) if self.rank == 0 else {}))
        self.window = LogWindow(asked, self.state, device=self.device, rank=self.rank, world=self.world,
                                speaks_for_node=ctx.get_local_rank() == 0, flops_per_sample=self.flops_per_sample,
                                job_start_time=inputs.job_start_time, engine=self.engine,
                                workers_on_node=ctx.get_local_world_size(),
                                counts_its_share=layout.counts_its_share(self.rank))
        self.profile = StepProfiler(asked, self.engine, self.tracker, inputs.run_dir, self.rank, self.world,
                                    self.state.step, self.plan.global_batch_size) if cfg.profile else None

    def _placement(self, layout: MeshLayout) -> dict[str, Any]:
        """Where this attempt's tensor-parallel groups sit (one all-gather of the workers' Ray node ids, as 60-bit
        numbers; not Ray Train's node rank, by IP): the most nodes one spans, each node's workers in rank order."""
        mine = int(ray.get_runtime_context().get_node_id()[:15], 16)
        nodes = [n for n, in allgather_ints([mine], self.device, self.world)]
        return {"tensor_group_nodes": nodes_spanned(layout, nodes, "tp"),
                "workers_per_node": tuple(nodes.count(n) for n in dict.fromkeys(nodes))}

    def _advise_placement(self, placement: dict[str, Any]) -> None:
        """Rank 0 says so at the start when a tensor-parallel group spans nodes (`rule_tensor_across_nodes`)."""
        advice = placement and placement_line(self.config, placement["tensor_group_nodes"],
                                              placement["workers_per_node"])
        if advice:
            self.tracker.progress({"message": advice})

    def _sample_log(self, layout: MeshLayout) -> SampleLog:
        """`train.record_samples`: one rank of each tensor and pipeline group records what its group trained on."""
        coords = layout.coords(self.rank)
        return SampleLog(self.inputs.run_dir, self.rank, self.world, self.dp_rank, self.dp,
                         records=coords["tp"] == 0 == coords["pp"])

    def _resume(self, saved: dict[str, Any]) -> None:
        """The checkpoint's train state and unsent metrics; eager, fp8 probe included, where compiling failed."""
        self.state.resume_from(saved)
        self.tracker.restore_pending(self.state.pending_metrics)
        if self.state.compile_fell_back:
            self.engine.train_eager()

    def _open_compile_cache(self) -> CompileCache | None:
        """`train.compile.cache`: an earlier attempt's compiled graphs, loaded before the first step compiles."""
        if not (self.engine.compile and self.engine.compile.cache):
            return None
        cache = CompileCache(self.inputs.run_dir, self.rank)
        artifacts = cache.load()
        if artifacts:
            self.tracker.event("compile_cache", loaded_artifacts=artifacts, step=self.state.step)
        return cache

    def _record_attempt(self, layout: MeshLayout, checkpoint: str | None, placement: dict[str, Any]) -> None:
        self.tracker.attempt(world_size=self.world, resumed_from_step=self.state.step,
                             max_steps=self.config.train.max_steps, global_batch_size=self.plan.global_batch_size,
                             accumulation=self.sampler.accumulation, lr_factor=self.plan.lr_factor, checkpoint=checkpoint,
                             mesh=dict(zip(("pipeline", "replicate", "shard", "tensor"), layout.shape)),
                             blocks=self.model_blocks, **placement)

    def _build_engine(self) -> Engine:
        cfg = self.config
        task = build_task(cfg.task)
        self.flops_per_sample = flops_per_sample(cfg, task, self.train)
        facts = device_facts(self.device)
        precision = agree_on_precision(choose_precision(cfg.train.precision, facts, cfg.train.tf32, cfg.train.fp8),
                                       facts, cfg.train.tf32, self.device, self.world)
        strategy = build_strategy(cfg.parallelism, world=self.world, rank=self.rank, device=self.device,
                                  param_dtype=sharded_param_dtype(precision.name),
                                  split_logits_ok=cfg.task == "language_modeling")
        init = initial_model(cfg.model.name, cfg.model.kwargs, seed=cfg.seed, world=self.world,
                             sharded=strategy.sharded)
        self.on_meta = init.on_meta  # its weights come from the checkpoint restored next, or `_initial_weights`
        self.model_blocks = len(transformer_blocks(init.model))  # the attempt event's, for the advice
        return Engine(init.model, task, cfg.train, device=self.device, world_size=self.dp, precision=precision,
                      global_batch_size=self.plan.global_batch_size, lr_factor=self.plan.lr_factor, strategy=strategy)

    def _initial_weights(self) -> None:
        """The run's initial weights (same seed) and a fresh optimizer: rank 0's sent into every rank's part
        of a model built on the meta device, else each rank's own whole build."""
        cfg = self.config
        if self.on_meta:
            weights = rank0_weights(cfg.model.name, cfg.model.kwargs, seed=cfg.seed, rank=self.rank)
            self.engine.start_over(weights, from_rank0=True)
        else:
            self.engine.start_over(initial_model(cfg.model.name, cfg.model.kwargs, seed=cfg.seed, world=self.world,
                                                 sharded=False).model.state_dict())

    # ---- a training step ---------------------------------------------------------------------

    def train_step(self, step: int, positions: np.ndarray, epoch: int, offset: int) -> StepStats:
        t0 = perf_now()
        with phase("data"):  # the `openclaw/<phase>` labels of a profile (`openclaw.profiling`); free otherwise
            mine = self.sampler.split(positions)
            batches = [self.train.batch(p) for p in mine]
            now, ahead = self.sampler.windows_at(epoch, offset)
            self.train.prefetch(ahead, keep=now)  # after this step's own shards
        t1 = perf_now()
        # by data-parallel rank: tensor and pipeline peers draw the same dropout, as one model would (seeded
        # by their own ranks, the copies a tensor-parallel plan keeps alike drifted apart)
        seed_step(self.config.seed, step, self.dp_rank)
        with phase("step"):  # each micro-batch's dropout follows its samples, at any world size
            seeds = [micro_batch_seed(self.config.seed, step, start) for start in self.sampler.micro_starts]
            stats = self.engine.train_step(step, batches, seeds)
        self.window.add(batches, stats, data_s=t1 - t0, compute_s=perf_now() - t1)
        if stats.compiled or self.engine.fell_back:
            self._after_compile(step)
        if self.samples_log:
            self.samples_log.write(step, epoch, mine, stats.finite)
        self.precision.after_step(step, stats.overflow)
        if not self.stepped:  # training again: where a restart's or resize's recovery time ends
            self.stepped = True
            self.tracker.event("first_step", step=step, world_size=self.world,
                               setup_s=round(time.time() - self.began, 3))
        return stats

    def _after_compile(self, step: int) -> None:
        """Save the compile cache after the attempt's first compile; say so when compiling failed."""
        if self.engine.fell_back:
            self.tracker.progress({"message": f"torch.compile failed; training eager (`train.compile.fallback: "
                                              f"eager`): {self.engine.fell_back}"})
            self.tracker.event("compile_fallback", step=step, error=self.engine.fell_back)
            self.state.compile_fell_back, self.engine.fell_back = self.engine.fell_back, None
        elif self.compile_cache and not self.compile_cache.saved:
            saved = self.compile_cache.save()
            self.tracker.event("compile_cache", saved_bytes=saved, step=step,
                               compile_s=round(self.engine.compile_counters.compile_s, 2))

    def on_nonfinite(self, decision: NonFiniteDecision) -> bool:
        """Carry out the non-finite policy's decision (the engine has not applied the step). True if the
        run rolled back, and the loop carries on from the restored step."""
        if isinstance(decision, Fail):
            raise NonFiniteLossError(decision.message)
        state, loaded = self.state, None
        skipped = state.with_skipped(decision.step, decision.batch)
        if isinstance(decision, Rollback):
            loaded = restore(self.inputs.run_dir, self.tracker, self.engine, self._check_resumable)
            if loaded:
                state.roll_back_to(loaded["state"])
            else:  # before the first checkpoint: the last valid state is the initial one
                self._start_over()
            self.tracker.rollback(state.pending_metrics)
            self.window.restart(state)
            self.precision.restored(loaded["trainer"].get("scaler") if loaded else None)
        state.load_state_dict(skipped)
        rolled_back, skipped = isinstance(decision, Rollback), skipped["skipped_steps"]
        if rolled_back:
            self.precision.after_rollback(decision.step, len(skipped))
        action = "rollback" if rolled_back else "skip"
        self.tracker.event("nonfinite_loss", step=decision.step, action=action,
                           resumed_from_step=state.step if rolled_back else None,
                           checkpoint=loaded["path"] if loaded else None, skipped_batches=len(skipped))
        self.tracker.progress({"message": f"non-finite loss at step {decision.step}: {action} "
                                          f"({len(skipped)} batch(es) skipped so far)"})
        return rolled_back

    def _check_resumable(self, state: dict[str, Any], path: str) -> None:
        check_same_order(state, len(self.train), self.train.shard_rows(), self.config.data.shuffle_window_shards, path)

    def _start_over(self) -> None:
        """Back to step 0 with the initial weights (same seed) and a fresh optimizer."""
        self._initial_weights()
        self.state.start_over()

    # ---- checkpoints and stops ---------------------------------------------------------------

    def checkpoint(self, stop: StopFlag, written: bool) -> None:
        """Report a finished background save, save when due (or asked to stop), and keep the stall out of
        the throughput."""
        t0, step, max_steps = time.perf_counter(), self.state.step, self.config.train.max_steps
        with phase("checkpoint"):
            if written:  # rank 0's background checkpoint is on storage: every rank reports it now
                self.saver.report_ready()
            if step == max_steps:  # this attempt's wall time per step, all included: in the final report
                self.window.last["perf/wall_step_s"] = self.window.wall_step_s(step)
            if should_save(step, self.config) or stop:
                self.precision.at_checkpoint()
                self.window.carry(self.state)
                self.saver.save(self.window.last, final=bool(stop) or step == max_steps)
        if self.profile:  # a profiled step ends here; the profile's own end (gather, report) is no training time
            self.profile.step_ends(step)
        self.window.exclude(time.perf_counter() - t0)  # checkpoint stalls are not training time
        for saved_step, stall_s in self.saver.take_completed():
            self.tracker.log_metrics({"perf/checkpoint_stall_s": stall_s}, saved_step)

    def answer_stop(self, stop: StopFlag) -> bool:
        """After the stop checkpoint: go on (CHECKPOINT), end the loop (STOP: True) or fail on purpose (TERM)."""
        step, tracker = self.state.step, self.tracker
        if stop == StopFlag.CHECKPOINT:
            cause = self.stops.checkpoint_answered(step)
            tracker.event("checkpoint_requested", step=step, cause=cause)
            tracker.progress({"message": f"{cause}: checkpointed at step {step}, training on"})
            return False
        if stop == StopFlag.STOP:
            tracker.event("stopped", step=step, cause="driver asked to stop")
        if stop == StopFlag.STOP or step >= self.config.train.max_steps:  # (TERM at the last: the run is done)
            return True
        tracker.event("preempted", step=step, cause="SIGTERM")
        tracker.progress({"message": f"SIGTERM: checkpointed at step {step}; Ray Train restarts from there"})
        self.close()
        raise WorkerPreempted(f"a training worker got SIGTERM; checkpointed at step {step}, resuming from there")

    def close(self) -> None:
        """The attempt ends on purpose: stop polling, close the data, publish what is left."""
        self.stops.close()
        self.train.close()
        self.tracker.close()
