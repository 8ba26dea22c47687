"""The logging window's decisions that every rank must take alike (worker process; no process group:
each rank's window is built as its worker builds it)."""
import time

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

