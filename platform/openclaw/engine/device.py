"""Process-wide settings of the device a worker computes on (plain torch; worker process)."""
from __future__ import annotations

import os

import torch

from openclaw.engine.config import TrainConfig

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's fixed workspace, which its deterministic results need (CUDA's reproducibility notes)."""


def configure_process(train: TrainConfig, cpus: int) -> None:
    """Process-wide settings, the same in every attempt so that a restart reproduces the run bit for bit:
    intra-op threads (`train.threads_per_worker`, else the worker's CPUs), flushing subnormals, and
    deterministic kernels (`train.deterministic`). Called as the worker starts, before its first matmul."""
    torch.set_num_threads(train.intra_op_threads(cpus))
    torch.set_flush_denormal(train.flush_denormal)
    set_deterministic(train.deterministic)


def set_deterministic(on: bool) -> None:
    """torch's deterministic kernels, cuDNN's deterministic convolutions without benchmarking (which may
    pick another algorithm each run) and cuBLAS's fixed workspace; off: torch's defaults. A workspace the
    user set is kept."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False
