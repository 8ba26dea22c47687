"""Process-wide settings of the device a worker computes on (plain torch; worker process)."""
from __future__ import annotations

import torch

from openclaw.engine.config import TrainConfig


def configure_cpu(train: TrainConfig, cpus: int) -> None:
    """Process-wide CPU settings, the same in every attempt so that a restart reproduces the run bit for
    bit: intra-op threads (`train.threads_per_worker`, else the worker's CPUs) and flushing subnormals."""
    torch.set_num_threads(train.intra_op_threads(cpus))
    torch.set_flush_denormal(train.flush_denormal)
