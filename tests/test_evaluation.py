"""Evaluation during training: which validation rows each rank scores (`train.eval_rows`), how many
evaluations a run has left, and an evaluation's time kept out of the throughput, out of the step's time
split, and in the ETA on its own (pure logic and one logging window, no Ray)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from openclaw import load_config
from openclaw.config import Config
from openclaw.engine.engine import StepStats
from openclaw.engine.state import TrainState
from openclaw.errors import ConfigError
from openclaw.runtime.evaluate import eval_positions, eval_rows, evals_from, should_eval
from openclaw.runtime.log_window import LogWindow
from openclaw.tracking.progress import format_progress

DIGITS = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "digits.yaml"


def cfg(**overrides) -> Config:
    return load_config(DIGITS, overrides)


@pytest.mark.parametrize("max_steps,every,val", [(300, 100, True), (250, 100, True), (300, 0, True), (7, 3, True),
                                                  (1, 1, True), (300, 100, False), (64, 5, True)])
def test_evals_left_are_the_steps_that_evaluate_from_here_to_the_end(max_steps, every, val):
    config = cfg(**{"train.max_steps": max_steps, "train.eval_every": every, **({} if val else {"data.val": None})})
    for step in range(0, max_steps + 3):
        want = sum(should_eval(s, config) for s in range(max(step, 1), max_steps + 1))
        assert evals_from(step, config) == want, (step, max_steps, every, val)


def test_a_run_of_a_quadrillion_steps_counts_its_evaluations_without_walking_them():
    config = cfg(**{"train.max_steps": 10 ** 15, "train.eval_every": 7})  # walking these would never end
    # every 7th step, and the end (10 ** 15 is no multiple of 7; 10 ** 15 - 6 is one)
    assert evals_from(1, config) == 10 ** 15 // 7 + 1 and evals_from(10 ** 15 - 6, config) == 2


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
def test_each_data_parallel_rank_scores_its_share_of_the_first_eval_rows(world):
    rows = eval_rows(10_000, cfg(**{"train.eval_rows": 1000}))
    assert rows == 1000
    shares = [eval_positions(rows, r, world) for r in range(world)]
    together = np.concatenate(shares)
    assert sorted(together.tolist()) == list(range(1000))  # each of the first 1000 once, nothing past them
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_eval_rows_past_the_set_or_unset_score_the_whole_set_and_zero_is_refused():
    assert eval_rows(1797, cfg(**{"train.eval_rows": 5000})) == 1797
    assert eval_rows(1797, cfg()) == 1797
    with pytest.raises(ConfigError, match="train.eval_rows"):
        cfg(**{"train.eval_rows": 0})


class Tracker:
    def __init__(self):
        self.metrics, self.lines = {}, []

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)

    def progress(self, item):
        self.lines.append(item)


class Data:
    def ingest_rows_per_s(self):
        return 0.0

    def take_wait_s(self):
        return 0.0



def _window(began_s_ago: float) -> LogWindow:
    """Rank 0's logging window of a 30-step run that evaluates every 10 steps, begun `began_s_ago`."""
    config = cfg(**{"train.max_steps": 30, "train.log_every": 10, "train.eval_every": 10})
    window = LogWindow(config, TrainState(), device=torch.device("cpu"), rank=0, world=1, speaks_for_node=False,
                       flops_per_sample=None, job_start_time=time.time())
    window.t0 = window.wall_t0 = window._eta_t0 = time.perf_counter() - began_s_ago
    return window


def _ten_steps_then_log(window: LogWindow, step: int) -> Tracker:
    """Ten one-second steps of 64 samples (0.1 s of data, 0.9 s of compute each), then the log at `step`."""
    stats = StepStats(loss_sum=64.0, samples=64, lr=1e-3, grad_norm=1.0, finite=True)
    for _ in range(10):
        window.add([{"x": torch.zeros(64, 8)}], stats, data_s=0.1, compute_s=0.9)
    state, tracker = TrainState(), Tracker()
    state.step = step
    window.log(state, 0, 64, Data(), tracker)
    return tracker


def test_an_evaluation_is_out_of_the_throughput_and_the_time_split_and_in_the_eta_on_its_own():
    """The window of steps 11 to 20: the 100 s evaluation of step 10 (after that step's log), then 10
    one-second steps. It reads 64 samples/s and no idle time, not the 5.8 samples/s and 91% idle it would
    read with the evaluation in; the ETA is the 10 steps left at one second each plus 100 s for each
    evaluation left (steps 20 and 30)."""
    window = _window(began_s_ago=110.0)  # the evaluation, then 10 steps
    window._eta_step = 10  # the ETA's last log: step 10's
    assert window.evaluated(100.0) == 100.0
    tracker = _ten_steps_then_log(window, 20)
    assert tracker.metrics["train/samples_per_s"] == pytest.approx(64.0, rel=0.01)
    assert tracker.metrics["perf/idle_frac"] < 0.01
    (line,) = [item for item in tracker.lines if "eta_s" in item]
    assert line["eta_s"] == pytest.approx(10 * 1.0 + 2 * 100.0, rel=0.01) and "evals_untimed" not in line


def test_before_the_first_evaluation_the_eta_says_how_many_it_leaves_out():
    """No evaluation has run yet this attempt, so none is timed: the ETA counts the steps, and says how
    many evaluations come on top."""
    window = _window(began_s_ago=10.0)
    tracker = _ten_steps_then_log(window, 5)  # at step 5 of 30: the evaluations at 10, 20 and 30 are to come
    (line,) = [item for item in tracker.lines if "eta_s" in item]
    assert line["evals_untimed"] == 3 and line["eta_s"] == pytest.approx(25 * 2.0, rel=0.01)
    assert format_progress(line).endswith("ETA 50s + 3 evaluations")
    assert format_progress({**line, "evals_untimed": 1}).endswith("ETA 50s + 1 evaluation")


def test_the_progress_line_says_what_an_evaluation_scored_and_how_long_it_took():
    line = format_progress({"step": 30, "max_steps": 60, "val/loss": 3.069, "eval_rows": 11214, "eval_s": 211.4})
    assert line == "step 30/60  val/loss 3.0690  (11,214 rows in 3m31s)"
    short = format_progress({"step": 100, "max_steps": 300, "val/loss": 0.2, "val/accuracy": 0.95, "eval_rows": 1797,
                             "eval_s": 0.42})
    assert short == "step 100/300  val/loss 0.2000  val/accuracy 0.9500  (1,797 rows in 0.42s)"
    assert format_progress({"step": 1, "max_steps": 2, "val/loss": 1.0, "eval_rows": 359, "eval_s": 0.013}).endswith(
        "(359 rows in 0.01s)")
