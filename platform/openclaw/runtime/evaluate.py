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


def evaluate(engine: Engine, data: ShardedData, micro: int, world: int, rank: int) -> dict[str, float]:
    """Every worker scores a strided share of the validation set; sums are reduced across workers."""
    sums = engine.evaluate(data.sequential(np.arange(rank, len(data), world), micro))
    keys = sorted(set(sums) | {"loss", "count"})
    totals = dict(zip(keys, allreduce_sum([sums.get(k, 0.0) for k in keys], engine.device)))
    out = {"val/loss": totals["loss"] / max(1.0, totals["count"])}
    if "correct" in totals:
        out["val/accuracy"] = totals["correct"] / max(1.0, totals["count"])
    return out
