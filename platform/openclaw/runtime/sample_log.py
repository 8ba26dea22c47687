"""`train.record_samples`: the sample positions every step trained on, for audits of the data order
(worker process)."""
from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
import torch.distributed as dist


class SampleLog:
    """One JSON line per step in `<run folder>/samples/rank<R>-<pid>.jsonl`, tagged with the attempt (one id
    for all ranks of a worker group). A step replayed after a restart or rollback appears again, later:
    the newest attempt that ran a step is the one the final model saw.
    """

    def __init__(self, run_dir: str, rank: int, world: int, dp_rank: int, dp: int, records: bool = True):
        """Collective: every rank of the attempt takes rank 0's attempt id. Ranks are recorded as their
        share of the data (`dp_rank` of `dp`); of the ranks that share one (tensor or pipeline
        parallelism), only the one with `records` writes."""
        folder = os.path.join(run_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        self.rank, self.world = dp_rank, dp
        ids = [uuid.uuid4().hex]
        if dist.is_available() and dist.is_initialized() and world > 1:
            dist.broadcast_object_list(ids, src=0)
        self.attempt = ids[0]
        self.file = open(os.path.join(folder, f"rank{dp_rank}-{os.getpid()}.jsonl"), "a", buffering=1) \
            if records else None

    def write(self, step: int, epoch: int, micro_batches: list[np.ndarray], applied: bool) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"t": time.time(), "attempt": self.attempt, "step": step, "epoch": epoch,
                                    "world": self.world, "rank": self.rank, "applied": applied,
                                    "positions": np.concatenate(micro_batches).tolist()}) + "\n")
