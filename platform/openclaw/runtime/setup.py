"""What an attempt builds from the config before its loop, beside the engine (worker process): the
datasets it streams, and the FLOPs of one training sample."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from openclaw.config import Config
from openclaw.data.config import DataConfig
from openclaw.data.filesystems import is_remote
from openclaw.data.shard_cache import ShardCache
from openclaw.data.stream import ShardedData
from openclaw.engine.flops import training_flops
from openclaw.engine.models import build_model

log = logging.getLogger("openclaw")


def open_datasets(data: dict[str, Any], d: DataConfig, pin: bool) -> tuple[ShardedData, ShardedData | None]:
    """The train (and val) shards this run reads, held at most two shuffle windows at a time."""
    remote = any(is_remote(v["spec"]) for v in data.values())  # local data needs no node cache (nor its folder)
    cache = ShardCache(d.shard_cache.dir, d.shard_cache.max_bytes) if remote else None
    resident = 2 * d.shuffle_window_shards
    opened = {k: ShardedData(v["spec"], v["shards"], d.features, d.label, s3=d.s3, shard_cache=cache,
                             max_resident=resident, pin=pin) for k, v in data.items()}
    return opened["train"], opened.get("val")


def flops_per_sample(cfg: Config, task, data: ShardedData) -> float | None:
    """Training FLOPs per sample (forward and backward), counted once at the start on a copy of the model on
    the meta device (no memory, no compute: any model size) with a micro-batch of the real data."""
    try:
        with torch.device("meta"):
            model = build_model(cfg.model.name, cfg.model.kwargs)
        rows = np.arange(min(cfg.train.micro_batch_size, len(data)))
        batch = {k: v.to("meta") for k, v in data.batch(rows).items()}
        return training_flops(model, task.loss, batch) / len(rows)
    except Exception as e:  # a model that cannot live on the meta device: no FLOP metrics, training goes on
        log.warning("could not count the model's FLOPs on the meta device (%s): no perf/flops_per_s or perf/mfu",
                    str(e).splitlines()[0][:200])
        return None
