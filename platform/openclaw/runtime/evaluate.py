"""Evaluation on the validation set, shared out over the ranks (worker process)."""
from __future__ import annotations

import numpy as np

from openclaw.config import Config
from openclaw.data.stream import ShardedData
from openclaw.engine.engine import Engine
from openclaw.engine.metrics import allreduce_sum


def should_eval(step: int, cfg: Config) -> bool:
    every = cfg.train.eval_every
    return cfg.data.val is not None and ((every and step % every == 0) or step == cfg.train.max_steps)


def evals_from(step: int, cfg: Config) -> int:
    """How many evaluations a run has left from `step` to its end, one at `step` included (pure): the
    ETA's share of evaluation time. The loop evaluates after a step, so at step 1 at the earliest."""
    end, every, step = cfg.train.max_steps, cfg.train.eval_every, max(step, 1)
    if cfg.data.val is None or step > end:
        return 0
    if not every:
        return 1
    return end // every - (step - 1) // every + (1 if end % every else 0)


def eval_rows(total: int, cfg: Config) -> int:
    """How many validation rows an evaluation scores: the first `train.eval_rows` (all where unset)."""
    limit = cfg.train.eval_rows
    return total if limit is None else min(total, limit)


def eval_positions(rows: int, rank: int, world: int) -> np.ndarray:
    """The positions of the first `rows` validation rows that data-parallel rank `rank` of `world` scores
    (pure): every `world`-th, from its rank on. Model-parallel peers share a data-parallel rank, so they
    score the same rows."""
    return np.arange(rank, rows, world)


def evaluate(engine: Engine, data: ShardedData, micro: int, world: int, rank: int, rows: int) -> dict[str, float]:
    """Every worker scores a strided share of the first `rows` validation rows; sums are reduced across
    workers."""
    sums = engine.evaluate(data.sequential(eval_positions(rows, rank, world), micro))
    keys = sorted(set(sums) | {"loss", "count"})
    totals = dict(zip(keys, allreduce_sum([sums.get(k, 0.0) for k in keys], engine.device)))
    out = {"val/loss": totals["loss"] / max(1.0, totals["count"])}
    if "correct" in totals:
        out["val/accuracy"] = totals["correct"] / max(1.0, totals["count"])
    return out
