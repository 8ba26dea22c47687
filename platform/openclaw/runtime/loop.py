"""The training loop that runs inside every Ray Train worker (worker process). It reads top to bottom:
one step's batch, the stop vote, the step, the non-finite policy, then the log/eval/save predicates.

What the loop holds is built by `runtime.attempt.Attempt`; the driver-side code is in `openclaw.launch`.
"""
from __future__ import annotations

import time
from typing import Any

from openclaw.runtime.attempt import Attempt
from openclaw.runtime.evaluate import eval_rows, evaluate, should_eval
from openclaw.runtime.policies import nonfinite_decision

__all__ = ["train_loop"]


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's training function: `loop_config` is {"inputs": LoopInputs}."""
    a = Attempt(loop_config["inputs"])
    cfg, state, G = a.config, a.state, a.plan.global_batch_size
    max_steps = cfg.train.max_steps
    while state.step < max_steps:
        step = state.step
        positions, epoch, offset = a.sampler.global_batch_at(state.epoch, state.offset)
        vote = a.stops.start(a.saver.writing())  # agreed on by all ranks while the step computes

        # ---- the step (a batch skipped before a rollback stays skipped on the replay, its samples at any world)
        batch = (epoch, offset, offset + len(positions))
        stats = None if state.skips(step, *batch) else a.train_step(step, positions, epoch, offset)
        stop, writing = a.stops.finish(vote)
        if stats is not None and not stats.finite:  # the flag is all-reduced: every rank decides alike
            if a.on_nonfinite(nonfinite_decision(cfg.train.on_nonfinite_loss, step, stats.lr, batch)):
                continue  # rolled back: carry on from the restored step
        state.advance(epoch, offset, G)

        # ---- logging and evaluation
        if a.window.due(state.step):
            a.window.log(state, epoch, G, a.train, a.tracker)
        if should_eval(state.step, cfg):
            t0, rows = time.perf_counter(), eval_rows(len(a.val), cfg)
            val_metrics = evaluate(a.engine, a.val, cfg.train.micro_batch_size, a.dp, a.dp_rank, rows)
            eval_s = a.window.evaluated(time.perf_counter() - t0)  # out of the throughput, into the ETA
            a.tracker.log_metrics({**val_metrics, "perf/eval_s": eval_s}, state.step)
            a.tracker.progress({"step": state.step, "max_steps": max_steps, **val_metrics, "eval_rows": rows,
                                "eval_s": eval_s})
            a.window.last.update(val_metrics)

        # ---- checkpoints, and the answer to a stop (after its checkpoint)
        a.checkpoint(stop, a.saver.written(writing))
        if stop and a.answer_stop(stop):
            break
    a.close()
