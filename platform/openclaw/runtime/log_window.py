"""The metrics of the training loop's logging windows (worker process): training loss, throughput, the
step's time split (every rank's: data, compute, communication, idle, and the straggler index), MFU,
the gradient noise scale (`engine.noise`), each node's system sample, the ETA, and the data-wait advice.

Each rank sums its loss over the steps of a window; at a log step one all-reduce brings the sums (and
one system sample per node) together, and rank 0's tracker logs them. Rank 0 also carries the unlogged
steps of the window a checkpoint cut (`TrainState.loss_window`), so a resumed run's next `train/loss`
averages the same steps as an uninterrupted run's.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from openclaw.advice.rules import data_wait_line
from openclaw.config import Config
from openclaw.engine.engine import StepStats
from openclaw.engine.flops import device_peak_flops
from openclaw.engine.metrics import (RANK_FIELDS, StepClock, allreduce_max, allreduce_sum, memory_capacity_bytes,
                                     node_sample_vector, peak_memory_bytes, per_node_metrics, rank_breakdown,
                                     system_metrics)
from openclaw.engine.noise import NoiseWindow
from openclaw.engine.state import TrainState
from openclaw.runtime.evaluate import evals_from


def should_log(step: int, cfg: Config) -> bool:
    return step % cfg.train.log_every == 0 or step == cfg.train.max_steps


class LogWindow:
    def __init__(self, cfg: Config, state: TrainState, *, device: torch.device, rank: int, world: int,
                 speaks_for_node: bool, flops_per_sample: float | None, job_start_time: float, engine=None,
                 workers_on_node: int = 1, counts_its_share: bool = True):
        """`speaks_for_node`: this rank samples its node's CPU and memory (the node's first local rank).
        `counts_its_share`: this rank's samples and loss count in the run's totals (`MeshLayout.counts_its_share`:
        one rank of each tensor and pipeline group, whose peers trained on the same samples).
        `flops_per_sample`: training FLOPs per sample (`perf/flops_per_s`, and `perf/mfu` on a GPU in the
        peak table, at the peak of the precision in use). `engine`: whose state bytes and precision."""
        self.cfg, self.device, self.rank, self.world, self.engine = cfg, device, rank, world, engine
        self.sample_node = speaks_for_node and cfg.tracking.enabled
        self.share = 1.0 if counts_its_share else 0.0  # the weight of this rank's samples and loss in the sums
        self.flops_per_sample = flops_per_sample
        self.job_start_time = job_start_time
        self.capacity = memory_capacity_bytes(device, workers_on_node, cfg.train.memory_budget_gb)
        self.clock = StepClock()
        self.last: dict[str, Any] = {}
        """The newest logged (and evaluated) metrics: what each checkpoint reports to Ray Train."""
        self.tokens_per_sample: int | None = None  # language modeling: known from the first batch
        self.first_step_s: float | None = None
        self._stats: StepStats | None = None
        self._advised = False
        self.noise = NoiseWindow()  # the gradient noise scale's pairs (engine.noise)
        self.eval_s = 0.0
        """The last evaluation's seconds (none yet this attempt: 0, and the ETA leaves evaluations out)."""
        self.loop_t0 = time.perf_counter()
        self.first_step = state.step
        self.restart(state)
        system_metrics(device)  # primes psutil's CPU counter

    def restart(self, state: TrainState) -> None:
        """A new window from `state` (the attempt's start, or a rollback): rank 0 carries the cut window."""
        carried = state.loss_window if self.rank == 0 else [0.0, 0.0]
        self.loss_sum, self.samples = carried[0], int(carried[1])
        self.filled = state.loss_window[1] > 0  # alike on every rank (the state is), unlike `samples`
        self.noise.reset(state.noise_window, mine=self.rank == 0)
        # samples whose time is not in the window's: the carried ones (trained before the restart, in the
        # loss average but not the throughput), and later those of steps that compiled
        self.untimed = self.samples
        self.t0 = self.wall_t0 = time.perf_counter()  # wall_t0: the per-rank split's (checkpoint stalls in)
        # the ETA's pace from here: after a rollback, the time since the last log (the lost steps, the
        # restore, the replay) over steps counted back from it made one ETA about 10x too long
        self._eta_t0, self._eta_step = self.t0, state.step

    def add(self, batches: list[dict[str, torch.Tensor]], stats: StepStats, data_s: float, compute_s: float) -> None:
        """A computed step (applied or not). A step that compiled is compile time (`perf/compile_s`): out of
        the throughput and the time split."""
        if stats.compiled:
            self.t0 += data_s + compute_s
            self.wall_t0 += data_s + compute_s
            self.untimed += stats.samples
        else:
            self.clock.add_step(data_s=data_s, compute_s=compute_s, comm_s=stats.comm_s)
        if self.first_step_s is None:  # start-up cost, preparation included: what a cache hit saves
            self.first_step_s = time.time() - self.job_start_time
        if self.tokens_per_sample is None and self.cfg.task == "language_modeling":
            self.tokens_per_sample = batches[0]["x"].shape[1] - 1
        self._stats = stats
        self.noise.add(stats.grad_pair)
        if stats.finite:
            self.loss_sum += stats.loss_sum
            self.samples += stats.samples
            self.filled = True

    def evaluated(self, seconds: float) -> float:
        """An evaluation took `seconds`: out of the throughput, the time split and the training time per
        step the ETA counts; the ETA adds this long for each evaluation still to come. Returns `seconds`."""
        self.t0 += seconds
        self.wall_t0 += seconds
        self._eta_t0 += seconds
        self.eval_s = seconds
        return seconds

    def exclude(self, seconds: float) -> None:
        """Time that is not training (checkpoint stalls): out of the throughput, into the time split."""
        self.t0 += seconds
        self.clock.checkpoint_s += seconds

    def due(self, step: int) -> bool:
        """Whether the window logs at `step`: the same answer on every rank, since `log` is collective. Only
        rank 0 holds a window a checkpoint carried, so its own samples cannot say."""
        return should_log(step, self.cfg) and self.filled

    def carry(self, state: TrainState) -> None:
        """Collective: the window so far, summed over the ranks, into `state` for the checkpoint to carry:
        the loss and samples, and the gradient noise scale's pairs."""
        state.loss_window = allreduce_sum([self.loss_sum * self.share, self.samples * self.share], self.device)
        state.noise_window = self.noise.carry(self.device)

    def wall_step_s(self, step: int) -> float:
        """This attempt's wall time per step, everything included."""
        return (time.perf_counter() - self.loop_t0) / max(1, step - self.first_step)

    def log(self, state: TrainState, epoch: int, global_batch_size: int, data, tracker) -> None:
        """Collective: reduce the window, log it (rank 0), print progress and, once, advice; start anew."""
        sample = system_metrics(self.device) if self.sample_node else None
        node_vec = node_sample_vector(sample, self.rank, self.world) if self.cfg.tracking.enabled else []
        now = time.perf_counter()
        rank_vec = self.clock.rank_vector(now - self.wall_t0, self.rank, self.world)
        counted = [self.loss_sum * self.share, self.samples * self.share, self.untimed * self.share]
        totals = allreduce_sum([*counted, *rank_vec, *node_vec], self.device)
        loss_sum, n, untimed = totals[:3]
        ranks_end = 3 + len(RANK_FIELDS) * self.world
        sps = (n - untimed) / (now - self.t0)  # training throughput: checkpoint stalls and compiling excluded
        wall_step_s = (now - self._eta_t0) / max(1, state.step - self._eta_step)  # all but evaluations
        self._eta_t0, self._eta_step = now, state.step
        stats = self._stats
        self.last = {"train/loss": loss_sum / n, "train/lr": stats.lr, "train/samples_per_s": sps,
                     "train/grad_norm": stats.grad_norm, "train/epoch": epoch,
                     "train/global_batch_size": global_batch_size, "train/skipped_batches": len(state.skipped_steps),
                     **({"perf/time_to_first_step_s": self.first_step_s} if self.first_step_s is not None else {})}
        if state.overflow_steps or (self.engine is not None and self.engine.scaler.is_enabled()):
            self.last["train/overflow_steps"] = state.overflow_steps  # fp16: updates the loss scaler skipped
        noise, state.grad_noise_ema = self.noise.close(state.grad_noise_ema, self.device)
        self.last.update(noise)  # train/grad_noise_scale and its smoothed value, when measured
        perf = self.clock.window(n - untimed, self.tokens_per_sample, self.flops_per_sample, self._peak(), self.world)
        perf["perf/ingest_rows_per_s"] = data.ingest_rows_per_s()
        perf.update(rank_breakdown(totals[3:ranks_end]))
        perf.update(self._memory())
        if self.engine is not None and self.engine.compile_counters is not None:
            perf.update(self.engine.compile_counters.metrics())
        read_share = data.take_wait_s() / self.clock.data_s if self.clock.data_s else 0.0
        tracker.log_metrics({**self.last, **perf, **per_node_metrics(totals[ranks_end:])}, state.step)
        self.last.update(perf)  # the final metrics Ray returns: the last window's split, for the end-of-run advice
        max_steps = self.cfg.train.max_steps
        evals = evals_from(state.step, self.cfg)
        eta = {"eta_s": (max_steps - state.step) * wall_step_s + evals * self.eval_s,
               **({"evals_untimed": evals} if evals and not self.eval_s else {})}  # none has run yet to time
        tracker.progress({"step": state.step, "max_steps": max_steps, "loss": loss_sum / n, "samples_per_s": sps,
                          **eta})
        self._advise(state.step, perf["perf/data_wait_frac"], read_share, tracker)
        self.loss_sum, self.samples, self.untimed, self.filled = 0.0, 0, 0, False
        self.t0 = self.wall_t0 = time.perf_counter()
        self.clock.reset()

    def _peak(self) -> float | None:
        """One device's peak FLOP/s at the precision in force now (a run-time switch changes it)."""
        p = self.engine.precision if self.engine is not None else None
        return device_peak_flops(self.device, p.name, p.tf32) if p else None

    def _memory(self) -> dict[str, float]:
        """Collective: the largest rank's bytes of parameters, gradients and optimizer state, its peak
        memory (CUDA's allocator peak on GPUs, the resident set on CPUs), and its peak above its state (the
        largest of each: pipeline stages differ, so the peak less the state may be two ranks')."""
        held = (self.engine.state_bytes if self.engine is not None else None) or {}
        peak = peak_memory_bytes(self.device)
        values = [held.get("params", 0), held.get("grads", 0), held.get("optimizer", 0), sum(held.values()), peak,
                  max(0, peak - sum(held.values()))]
        names = ("param_bytes_per_rank", "grad_bytes_per_rank", "optimizer_bytes_per_rank", "state_bytes_per_rank",
                 "peak_memory_bytes", "peak_activation_bytes")
        out = {f"perf/{n}": v for n, v in zip(names, allreduce_max(values, self.device))}
        out["perf/memory_capacity_bytes"] = self.capacity  # the same on every rank of one kind of machine
        return out

    def _advise(self, step: int, data_wait_frac: float, read_share: float, tracker) -> None:
        # Not on the attempt's first window: its first step reads the first window of shards, a start-up
        # cost (in perf/time_to_first_step_s) that no knob hides.
        warm = step - self.first_step > self.cfg.train.log_every
        advice = None if self._advised or not warm else data_wait_line(self.cfg, data_wait_frac, read_share,
                                                                         self.world)
        if advice:  # the data-wait rule fired (`openclaw.advice`): quiet when its fix is in place
            tracker.progress({"message": advice})
            self._advised = True
