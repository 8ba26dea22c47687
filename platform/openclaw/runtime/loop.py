"""The training loop that runs inside every Ray Train worker. It reads top to bottom:
set-up, data, model and engine, restore, then the loop with its log/eval/save predicates.

Driver-side code lives in `openclaw.launch.session`; the two run in different processes.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from openclaw.config import Config
from openclaw.data.stream import ShardedData
from openclaw.data.filesystems import is_remote
from openclaw.data.shard_cache import ShardCache
from openclaw.engine.engine import Engine, build_optimizer, configure_cpu
from openclaw.errors import CheckpointError, NonFiniteLossError, WorkerPreempted
from openclaw.engine.models import build_model
from openclaw.engine.metrics import (StepClock, data_wait_advice, node_sample_vector, peak_flops, per_node_metrics,
                           system_metrics)
from openclaw.engine.metrics import now as perf_now
from openclaw.runtime.stops import CHECKPOINT, STOP, StopSignals, install_in_ray_worker
from openclaw.runtime.saver import Saver, restore
from openclaw.data.sampler import Sampler, batch_plan
from openclaw.engine.state import TrainState
from openclaw.engine.tasks import build_task
from openclaw.tracking.tracker import make_tracker

log = logging.getLogger("openclaw")


# ---- small predicates -----------------------------------------------------------------------------

def should_log(step: int, cfg: Config) -> bool:
    return step % cfg.train.log_every == 0 or step == cfg.train.max_steps


def should_eval(step: int, cfg: Config) -> bool:
    every = cfg.train.eval_every
    return cfg.data.val is not None and ((every and step % every == 0) or step == cfg.train.max_steps)


def should_save(step: int, cfg: Config) -> bool:
    return step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps


def seed_step(seed: int, step: int, rank: int) -> None:
    """RNG (dropout, ...) as a function of (seed, step, rank): a resumed step draws what the original drew."""
    torch.manual_seed((seed * 1_000_003 + step) * 4099 + rank)


# ---- data -----------------------------------------------------------------------------------------

class SampleLog:
    """`train.record_samples`: the sample positions every step trained on, for audits of the data order.

    One JSON line per step in `<run folder>/samples/rank<R>-<pid>.jsonl`, tagged with the attempt (one id
    for all ranks of a worker group). A step replayed after a restart or rollback appears again, later:
    the newest attempt that ran a step is the one the final model saw.
    """

    def __init__(self, run_dir: str, rank: int, world: int):
        """Collective: every rank of the attempt takes rank 0's attempt id."""
        import os
        import uuid
        folder = os.path.join(run_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        self.rank, self.world = rank, world
        ids = [uuid.uuid4().hex]
        if dist.is_available() and dist.is_initialized() and world > 1:
            dist.broadcast_object_list(ids, src=0)
        self.attempt = ids[0]
        self.file = open(os.path.join(folder, f"rank{rank}-{os.getpid()}.jsonl"), "a", buffering=1)

    def write(self, step: int, epoch: int, micro_batches: list[np.ndarray], applied: bool) -> None:
        self.file.write(json.dumps({"t": time.time(), "attempt": self.attempt, "step": step, "epoch": epoch,
                                    "world": self.world,
                                    "rank": self.rank, "applied": applied,
                                    "positions": np.concatenate(micro_batches).tolist()}) + "\n")


def _allreduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def evaluate(engine: Engine, data: ShardedData, micro: int, world: int, rank: int) -> dict[str, float]:
    """Every worker scores a strided share of the validation set; sums are reduced across workers."""
    sums = engine.evaluate(data.sequential(np.arange(rank, len(data), world), micro))
    keys = sorted(set(sums) | {"loss", "count"})
    totals = dict(zip(keys, _allreduce([sums.get(k, 0.0) for k in keys], engine.device)))
    out = {"val/loss": totals["loss"] / max(1.0, totals["count"])}
    if "correct" in totals:
        out["val/accuracy"] = totals["correct"] / max(1.0, totals["count"])
    return out


def open_datasets(data: dict[str, Any], config: Config, pin: bool) -> tuple[ShardedData, ShardedData | None]:
    """The train (and val) shards this run reads, held at most two shuffle windows at a time."""
    d = config.data
    remote = any(is_remote(v["spec"]) for v in data.values())  # local data needs no node cache (nor its folder)
    cache = ShardCache(d.shard_cache.dir, d.shard_cache.max_bytes) if remote else None
    resident = 2 * d.shuffle_window_shards
    opened = {k: ShardedData(v["spec"], v["shards"], d.features, d.label, s3=d.s3, shard_cache=cache,
                             max_resident=resident, pin=pin) for k, v in data.items()}
    return opened["train"], opened.get("val")


# ---- the loop -------------------------------------------------------------------------------------

def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    # ---- set-up
    config = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    configure_cpu(config.train, int(config.scaling.resources_per_worker.get("CPU", 1)))
    device = ray.train.torch.get_device()
    tracked = config.tracking.enabled
    tracker = make_tracker(rank, tracked, loop_config["tracking"], loop_config.get("progress"))
    t, micro = config.train, config.train.micro_batch_size
    plan = batch_plan(config.elastic.on_resize, config.elastic.lr_rule, t.global_batch_size, micro,
                      config.scaling.max_workers, world)
    G = plan.global_batch_size

    # ---- data
    train, val = open_datasets(loop_config["data"], config, pin=device.type == "cuda")
    sampler = Sampler(len(train), G, micro, config.seed, world, rank, train.shard_rows(),
                      config.data.shuffle_window_shards)

    # ---- model and engine
    torch.manual_seed(config.seed)
    model = ray.train.torch.prepare_model(build_model(config.model.name, config.model.kwargs))
    engine = Engine(model, build_task(config.task), t, device=device, world_size=world, global_batch_size=G,
                    lr_factor=plan.lr_factor)
    state = TrainState(world_size=world, num_samples=len(train), seed=config.seed, mlflow_run_id=loop_config["run_id"])
    loaded = restore(loop_config["run_dir"], tracker)
    if loaded:
        resume_from(loaded, engine, state, len(train))
        tracker.restore_pending(state.pending_metrics)

    # ---- record how this attempt started (the tracking service names it start/resume/restart/resize)
    tracker.attempt(world_size=world, resumed_from_step=state.step, max_steps=t.max_steps, global_batch_size=G,
                    accumulation=sampler.accumulation, lr_factor=plan.lr_factor,
                    checkpoint=loaded["path"] if loaded else None)
    state.world_size, state.attempt = world, state.attempt + 1
    samples_log = SampleLog(loop_config["run_dir"], rank, world) if t.record_samples else None
    saver = Saver(engine, state, tracker, loop_config["config"], rank, loop_config["run_dir"],
                  background=config.checkpoint.async_)
    install_in_ray_worker()
    stops = StopSignals(device, **(_driver_control(loop_config["tracking"]) if rank == 0 else {}))

    # ---- the loop
    window_loss, window_n = carried_loss_window(state, rank)
    window_t0, last_metrics = time.perf_counter(), {}
    eta_t0, eta_step = window_t0, state.step
    loop_t0, first_step = window_t0, state.step
    clock, advised, first_step_s = StepClock(), False, None
    tokens_per_sample = None  # language modeling: known from the first batch (no extra read at start-up)
    flops_per_token = getattr(engine._unwrapped(), "flops_per_token", lambda: None)()
    peak = peak_flops(device)
    system_metrics(device)  # primes psutil's CPU counter
    while state.step < t.max_steps:
        step = state.step
        positions, epoch, offset = sampler.global_batch_at(state.epoch, state.offset)
        vote = stops.start(saver.ready())  # agreed on while the step computes
        if step not in state.skipped_steps:  # a batch skipped before a rollback stays skipped on the replay
            t0 = perf_now()
            mine = sampler.split(positions)
            batches = [train.batch(p) for p in mine]
            if tokens_per_sample is None and config.task == "language_modeling":
                tokens_per_sample = batches[0]["x"].shape[1] - 1
            train.prefetch(sampler.next_window_shards(epoch, offset))  # after this step's own shards
            t1 = perf_now()
            seed_step(config.seed, step, rank)
            stats = engine.train_step(step, batches)
            clock.add_step(data_s=t1 - t0, compute_s=perf_now() - t1)
            if first_step_s is None:  # start-up cost, preparation included: what a cache hit saves
                first_step_s = time.time() - loop_config.get("job_start_time", time.time())
            if samples_log:
                samples_log.write(step, epoch, mine, stats.finite)
            stop, written = stops.finish(vote)
            if not stats.finite:  # the grad norm is global after DDP, so every rank decides alike
                if on_nonfinite(step, stats, config, engine, state, tracker, loop_config["run_dir"], len(train)):
                    (window_loss, window_n), window_t0 = carried_loss_window(state, rank), time.perf_counter()
                    continue  # rolled back: carry on from the restored step
            else:
                window_loss += stats.loss_sum
                window_n += stats.samples
        else:
            stop, written = stops.finish(vote)
        state.step, state.samples_seen = step + 1, state.samples_seen + G
        state.epoch, state.offset = epoch, offset + G

        if should_log(state.step, config) and window_n:
            # One all-reduce: the loss window and, when tracking, each node's system sample.
            sample = system_metrics(device) if tracked and ctx.get_local_rank() == 0 else None
            totals = _allreduce([window_loss, float(window_n),
                                 *(node_sample_vector(sample, rank, world) if tracked else [])], device)
            loss_sum, n = totals[:2]
            now = time.perf_counter()
            sps = n / (now - window_t0)  # training throughput: checkpoint stalls excluded
            wall_step_s = (now - eta_t0) / max(1, state.step - eta_step)  # the ETA counts everything
            eta_t0, eta_step = now, state.step
            last_metrics = {"train/loss": loss_sum / n, "train/lr": stats.lr, "train/samples_per_s": sps,
                            "train/grad_norm": stats.grad_norm, "train/epoch": epoch,
                            "train/global_batch_size": G, "train/skipped_batches": len(state.skipped_steps),
                            **({"perf/time_to_first_step_s": first_step_s} if first_step_s is not None else {})}
            perf = clock.window(n, tokens_per_sample, flops_per_token, peak, world)
            perf["perf/ingest_rows_per_s"] = train.ingest_rows_per_s()
            read_share = train.take_wait_s() / clock.data_s if clock.data_s else 0.0
            tracker.log_metrics({**last_metrics, **perf, **per_node_metrics(totals[2:])}, state.step)
            tracker.progress({"step": state.step, "max_steps": t.max_steps, "loss": loss_sum / n,
                              "samples_per_s": sps, "eta_s": (t.max_steps - state.step) * wall_step_s})
            # Not on the attempt's first window: its first step reads the first window of shards, a start-up
            # cost (in perf/time_to_first_step_s) that no knob hides.
            warm = state.step - first_step > config.train.log_every
            advice = None if advised or not warm else data_wait_advice(perf["perf/data_wait_frac"], read_share)
            if advice:
                tracker.progress({"message": advice})
                advised = True
            window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
            clock.reset()

        if should_eval(state.step, config):
            val_metrics = evaluate(engine, val, micro, world, rank)
            tracker.log_metrics(val_metrics, state.step)
            tracker.progress({"step": state.step, "max_steps": t.max_steps, **val_metrics})
            last_metrics.update(val_metrics)

        saving_t0 = time.perf_counter()
        if written:  # rank 0's background checkpoint is on storage: every rank reports it now
            saver.report_ready()
        if state.step == t.max_steps:  # this attempt's wall time per step, all included: in the final report
            last_metrics["perf/wall_step_s"] = (time.perf_counter() - loop_t0) / max(1, state.step - first_step)
        if should_save(state.step, config) or stop:
            state.loss_window = _allreduce([window_loss, float(window_n)], device)
            saver.save(last_metrics, final=bool(stop) or state.step == t.max_steps)
        saving_s = time.perf_counter() - saving_t0
        window_t0 += saving_s  # checkpoint stalls are not training time
        clock.checkpoint_s += saving_s
        for saved_step, stall_s in saver.take_completed():
            tracker.log_metrics({"perf/checkpoint_stall_s": stall_s}, saved_step)
        if stop and answer_stop(stop, state.step, stops, tracker):
            break
    stops.close()
    train.close()
    tracker.close()


def _driver_control(tracking) -> dict[str, Any]:
    """Rank 0 polls the driver's requests (stop, checkpoint before a resize) through the tracking service."""
    import ray
    return {"control": lambda: ray.get(tracking.control.remote(), timeout=10),
            "on_request_answered": lambda request, step: tracking.checkpoint_answered.remote(request, step)}


def answer_stop(stop: int, step: int, stops: StopSignals, tracker) -> bool:
    """After the stop checkpoint: fail on purpose (SIGTERM), end the loop (driver stop: True), or go on."""
    if stop == CHECKPOINT:
        cause = stops.checkpoint_answered(step)
        tracker.event("checkpoint_requested", step=step, cause=cause)
        tracker.progress({"message": f"{cause}: checkpointed at step {step}, training on"})
        return False
    if stop == STOP:
        stops.close()
        tracker.event("stopped", step=step, cause="driver asked to stop")
        tracker.close()
        return True
    tracker.event("preempted", step=step, cause="SIGTERM")
    tracker.progress({"message": f"SIGTERM: checkpointed at step {step}; Ray Train restarts from there"})
    tracker.close()
    stops.close()
    raise WorkerPreempted(f"a training worker got SIGTERM; checkpointed at step {step}, resuming from there")


def carried_loss_window(state: TrainState, rank: int) -> tuple[float, int]:
    """(loss sum, samples) of the unlogged steps before the restored step: rank 0 carries all ranks' share."""
    return (state.loss_window[0], int(state.loss_window[1])) if rank == 0 else (0.0, 0)


def resume_from(loaded: dict[str, Any], engine: Engine, state: TrainState, num_samples: int) -> None:
    state.load_state_dict(loaded["state"])
    if state.num_samples != num_samples:
        raise CheckpointError(f"checkpoint {loaded['path']} was trained on {state.num_samples} rows but "
                              f"`data.train` now has {num_samples}; use a new `name` to start a fresh run.")
    engine.load_state_dict({"model": loaded["model"], **loaded["trainer"]})


def on_nonfinite(step: int, stats, config: Config, engine: Engine, state: TrainState, tracker, run_dir: str,
                 num_samples: int) -> bool:
    """Carry out `train.on_nonfinite_loss`. The engine has not applied the step. True if rolled back."""
    policy = config.train.on_nonfinite_loss
    if policy == "fail":
        raise NonFiniteLossError(f"non-finite loss or gradient at global step {step} (lr {stats.lr:g}). Lower "
                                 f"`train.optimizer.lr`, check the data, or set `train.on_nonfinite_loss` to "
                                 f"skip or rollback.")
    skipped = sorted(set(state.skipped_steps) | {step})
    loaded = None
    if policy == "rollback":
        loaded = restore(run_dir, tracker)
        if loaded:
            resume_from(loaded, engine, state, num_samples)
        else:  # before the first checkpoint: the last valid state is the initial one
            start_over(engine, state, config)
        tracker.rollback(state.pending_metrics)
    state.skipped_steps = skipped
    tracker.event("nonfinite_loss", step=step, action=policy, resumed_from_step=state.step if policy == "rollback"
                  else None, checkpoint=loaded["path"] if loaded else None, skipped_batches=len(skipped))
    tracker.progress({"message": f"non-finite loss at step {step}: {policy} "
                                 f"({len(skipped)} batch(es) skipped so far)"})
    return policy == "rollback"


def start_over(engine: Engine, state: TrainState, config: Config) -> None:
    """Back to step 0 with the initial weights (same seed) and a fresh optimizer."""
    torch.manual_seed(config.seed)
    fresh = build_model(config.model.name, config.model.kwargs)
    engine.load_state_dict({"model": fresh.state_dict(),
                            "optimizer": build_optimizer(fresh, config.train.optimizer).state_dict()})
    state.step, state.samples_seen, state.epoch, state.offset, state.pending_metrics = 0, 0, 0, 0, []
    state.loss_window = [0.0, 0.0]
