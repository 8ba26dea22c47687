"""The logging window's decisions that every rank must take alike (worker process; no process group:
each rank's window is built as its worker builds it)."""
import time

import pytest
import torch

from openclaw import load_config
from openclaw.engine.engine import StepStats
from openclaw.engine.state import TrainState
from openclaw.runtime.log_window import LogWindow
from test_evaluation import DIGITS


def _windows(loss_window: list[float]) -> list[LogWindow]:
    """Two ranks' windows after a restart from a state that carries `loss_window`, logging every 2 steps."""
    config = load_config(DIGITS, {"train.log_every": 2})
    state = TrainState()
    state.loss_window = loss_window
    return [LogWindow(config, state, device=torch.device("cpu"), rank=rank, world=2, speaks_for_node=False,
                      flops_per_sample=None, job_start_time=time.time()) for rank in range(2)]


def test_every_rank_agrees_to_log_a_window_only_rank_0_carried():
    """A checkpoint at step 3 carried step 3's loss (on rank 0 alone); after a rollback the replayed step 4
    is the skipped batch, so no rank adds a step before the log at step 4. Rank 0 logs the carried step;
    every other rank must enter that collective too, where it once went on to the next step's."""
    windows = _windows([12.0, 8.0])
    assert [w.due(4) for w in windows] == [True, True]
    assert [w.due(3) for w in windows] == [False, False]  # off the log grid


def test_an_empty_window_logs_on_no_rank_until_a_step_fills_it():
    windows = _windows([0.0, 0.0])
    assert [w.due(4) for w in windows] == [False, False]
    stats = StepStats(loss_sum=16.0, samples=8, lr=1e-3, grad_norm=1.0, finite=False)
    for w in windows:
        w.add([{"x": torch.zeros(8, 64)}], stats, data_s=0.0, compute_s=0.1)
    assert [w.due(4) for w in windows] == [False, False]  # a non-finite step fills nothing
    stats = StepStats(loss_sum=16.0, samples=8, lr=1e-3, grad_norm=1.0, finite=True)
    for w in windows:
        w.add([{"x": torch.zeros(8, 64)}], stats, data_s=0.0, compute_s=0.1)
    assert [w.due(4) for w in windows] == [True, True]



class _Tracker:
    def log_metrics(self, metrics, step):
        self.metrics = metrics

    def progress(self, line):
        self.line = line


class _Data:
    def ingest_rows_per_s(self):
        return 0.0

    def take_wait_s(self):
        return 0.0


def test_the_samples_a_checkpoint_carried_count_in_the_loss_but_not_the_throughput(monkeypatch):
    """A resume's first window divided the carried steps' samples, trained before the restart, by this
    attempt's time alone: samples/s, tokens/s, FLOP/s and MFU read 1.67x after a checkpoint that carried 10
    of a window's 25 steps. A fake clock: each step takes 0.02 s."""
    import openclaw.runtime.log_window as log_window
    now = [1000.0]
    monkeypatch.setattr(log_window.time, "perf_counter", lambda: now[0])
    config = load_config(DIGITS, {"train.log_every": 25, "train.global_batch_size": 16, "train.micro_batch_size": 16,
                                  "scaling.min_workers": 1, "scaling.max_workers": 1})

    def first_window(carried_steps: int) -> dict:
        state = TrainState(step=100 + carried_steps)
        state.loss_window = [2.0 * 16 * carried_steps, 16.0 * carried_steps]  # a loss of 2 a sample
        window = LogWindow(config, state, device=torch.device("cpu"), rank=0, world=1, speaks_for_node=False,
                           flops_per_sample=1e6, job_start_time=time.time())
        for _ in range(25 - carried_steps):
            now[0] += 0.02
            window.add([{"x": torch.zeros(16, 64)}], StepStats(loss_sum=16.0, samples=16, lr=1e-3, grad_norm=1.0,
                                                                finite=True), data_s=0.0, compute_s=0.02)
            state.step += 1
        tracker = _Tracker()
        window.log(state, 0, 16, _Data(), tracker)
        return tracker.metrics

    fresh, resumed = first_window(0), first_window(10)
    for key, want in (("train/samples_per_s", 16 / 0.02), ("perf/samples_per_s", 16 / 0.02),
                      ("perf/flops_per_s", 1e6 * 16 / 0.02)):
        assert fresh[key] == pytest.approx(want, rel=1e-9) and resumed[key] == pytest.approx(want, rel=1e-9), key
    assert resumed["train/loss"] == (2.0 * 160 + 1.0 * 240) / 400  # the carried steps count in the average


def test_the_eta_after_a_rollback_paces_the_replayed_steps_not_the_time_lost(monkeypatch):
    """A rollback (a non-finite loss at step 99, back to the checkpoint at 50) restarted the window but not
    the ETA's pace: the log at step 55 divided the time since the log at 95 (the lost steps, the restore,
    the replay) by max(1, 55 - 95) steps, an ETA about 10x too long. A fake clock: each step takes 0.02 s."""
    import openclaw.runtime.log_window as log_window
    now = [1000.0]
    monkeypatch.setattr(log_window.time, "perf_counter", lambda: now[0])
    config = load_config(DIGITS, {"train.log_every": 5, "train.max_steps": 200, "train.eval_every": 0,
                                  "train.global_batch_size": 16, "train.micro_batch_size": 16,
                                  "scaling.min_workers": 1, "scaling.max_workers": 1})
    state = TrainState(step=90)
    window = LogWindow(config, state, device=torch.device("cpu"), rank=0, world=1, speaks_for_node=False,
                       flops_per_sample=None, job_start_time=time.time())
    tracker, stats = _Tracker(), StepStats(loss_sum=16.0, samples=16, lr=1e-3, grad_norm=1.0, finite=True)

    def steps(n):
        for _ in range(n):
            now[0] += 0.02
            window.add([{"x": torch.zeros(16, 64)}], stats, data_s=0.0, compute_s=0.02)
            state.step += 1
    steps(5)
    window.log(state, 0, 16, _Data(), tracker)  # step 95
    steps(4)
    now[0] += 3.0  # step 99's NaN, the restore
    state.step = 50
    window.restart(state)
    steps(5)
    window.log(state, 0, 16, _Data(), tracker)  # step 55
    assert tracker.line["step"] == 55 and tracker.line["eta_s"] == pytest.approx(145 * 0.02, rel=1e-6)
