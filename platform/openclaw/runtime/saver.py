"""Checkpoints as the training loop sees them (worker process): find and load the newest valid one, and
save, synchronously or in the background (`checkpoint.async`).

A synchronous save stalls training for the whole write: serialize, checksum, copy into storage, and
report to Ray Train. An asynchronous save stalls it only for a snapshot: rank 0 copies the model and
optimizer state to host memory and a thread writes, checksums and publishes the checkpoint straight
into the run's storage folder (manifest last). Every rank must then report it to Ray Train at the
same step: rank 0's "written" flag rides on the per-step vote (`stops.StopSignals`), and the
ranks report at the first step where it is set. Metrics are published with the checkpoint that
covers them, as with synchronous saves.

The final checkpoint and the checkpoint of a stop are always synchronous: they must be durable before
the workers return or exit.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from openclaw.config import Config
from openclaw.data.filesystems import storage_filesystem
from openclaw.engine import checkpoint as ckpt_io
from openclaw.errors import CheckpointError

log = logging.getLogger("openclaw")


def restore(run_dir: str, tracker) -> dict[str, Any] | None:
    """Load the newest checkpoint in the run's folder that passes its manifest check.

    The folder is scanned rather than trusting `ray.train.get_checkpoint()` alone: a worker can die
    after rank 0's report returned but before Ray's controller registered that checkpoint, and the
    metrics published with it must not be replayed. Invalid (partial, truncated, corrupt) checkpoints
    are reported and skipped in favour of the next newest.
    """
    for candidate in checkpoints_newest_first(run_dir):
        try:
            with candidate.as_directory() as d:
                loaded = ckpt_io.load(d)
            return loaded | {"path": candidate.path}
        except CheckpointError as e:
            msg = f"skipping invalid checkpoint: {e}"
            log.warning(msg)
            tracker.event("checkpoint_invalid", checkpoint=candidate.path, reason=str(e))
            tracker.progress({"message": msg})
    return None


def should_save(step: int, cfg: Config) -> bool:
    return step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps


def checkpoints_newest_first(run_dir: str):
    """Every `checkpoint_*` folder of a run (local path or URI), newest first (Ray names them by time)."""
    fs, root = storage_filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
                  reverse=True)
    return [Checkpoint(path, filesystem=fs) for path in dirs]


def to_host(obj: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to host memory: training can go on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def checkpoint_dir_name() -> str:
    """A new checkpoint folder's name, as Ray names them (by time, so that names sort oldest first)."""
    return "checkpoint_" + datetime.datetime.today().strftime("%Y-%m-%d_%H-%M-%S.%f")


def publish_dir(local: str, run_dir: str) -> str:
    """Copy a written checkpoint folder into the run's storage, manifest last; return its path there."""
    fs, root = storage_filesystem(run_dir)
    dest = f"{root.rstrip('/')}/{checkpoint_dir_name()}"
    fs.create_dir(dest, recursive=True)
    names = sorted(os.listdir(local), key=lambda n: n == ckpt_io.MANIFEST)  # the manifest goes last
    for n in names:
        with open(os.path.join(local, n), "rb") as src, fs.open_output_stream(f"{dest}/{n}") as out:
            shutil.copyfileobj(src, out, 8 << 20)
    return dest


class Saver:
    """Saves for one training loop. Every rank calls `save` and `report_ready` at the same steps."""

    def __init__(self, engine, state, tracker, config: dict, rank: int, run_dir: str, background: bool):
        self.engine, self.state, self.tracker, self.config = engine, state, tracker, config
        self.rank, self.run_dir, self.background = rank, run_dir, background
        self._thread: threading.Thread | None = None
        self._written: dict[str, Any] | None = None   # rank 0: the background write's outcome
        self._outstanding: dict[str, Any] | None = None  # every rank: {"step", "stall_s"} of a save not yet reported
        self._completed: list[tuple[int, float]] = []

    # ---- the per-step vote -------------------------------------------------------------------

    def ready(self) -> int:
        """1 on rank 0 once a background write has finished (and is not yet reported)."""
        return int(self._outstanding is not None and self._thread is not None and not self._thread.is_alive())

    def report_ready(self) -> None:
        """Every rank, at the step the vote said rank 0's background write is done: report it."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        done, step = self._written or {}, self._outstanding["step"]
        if self.rank == 0 and "error" in done:
            raise CheckpointError(f"the background checkpoint of step {step} failed: {done['error']}")
        checkpoint = Checkpoint(done["path"], filesystem=storage_filesystem(self.run_dir)[0]) if self.rank == 0 else None
        ray.train.report({"step": step, **done.get("metrics", {})}, checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        self.tracker.publish(through_step=step)
        self.tracker.event("checkpoint", step=step, world_size=self.state.world_size, mode="async",
                           checkpoint=done.get("path"))
        self._completed.append((step, self._outstanding["stall_s"] + time.perf_counter() - t0))
        self._thread, self._written, self._outstanding = None, None, None

    def take_completed(self) -> list[tuple[int, float]]:
        """(step, seconds training stalled for it) of every checkpoint reported since the last call."""
        done, self._completed = self._completed, []
        return done

    # ---- saving ------------------------------------------------------------------------------

    def save(self, metrics: dict[str, float], final: bool = False) -> None:
        """Save at the current step (in the background with `checkpoint.async`, unless `final`)."""
        if self._outstanding is not None:  # the previous background save has not been reported yet
            self.report_ready()
        t0 = time.perf_counter()
        if self.background and not final:
            self._begin_background(metrics)
            self._outstanding["stall_s"] = time.perf_counter() - t0
        else:
            self._save_now(metrics)
            self._completed.append((self.state.step, time.perf_counter() - t0))

    def _save_now(self, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory(prefix="openclaw-ckpt-") as d:
            checkpoint, name = None, checkpoint_dir_name()
            if self.rank == 0:
                self.state.pending_metrics = self.tracker.pending()
                es = self.engine.state_dict()
                ckpt_io.save(d, model=es["model"], trainer={k: v for k, v in es.items() if k != "model"},
                             state=self.state.state_dict(), config=self.config)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": self.state.step, **metrics}, checkpoint=checkpoint,
                             checkpoint_dir_name=name if checkpoint else None)
        self.tracker.publish()
        self.tracker.event("checkpoint", step=self.state.step, world_size=self.state.world_size, mode="sync",
                           checkpoint=f"{self.run_dir.rstrip('/')}/{name}")

    def _begin_background(self, metrics: dict[str, float]) -> None:
        self._outstanding = {"step": self.state.step, "stall_s": 0.0}
        if self.rank != 0:
            return
        self.state.pending_metrics = self.tracker.pending()
        snapshot = to_host(self.engine.state_dict())
        state, config = dict(self.state.state_dict()), self.config
        written: dict[str, Any] = {"metrics": dict(metrics)}

        def write() -> None:
            local = tempfile.mkdtemp(prefix="openclaw-ckpt-")
            try:
                ckpt_io.save(local, model=snapshot["model"], state=state, config=config,
                             trainer={k: v for k, v in snapshot.items() if k != "model"})
                written["path"] = publish_dir(local, self.run_dir)
            except Exception as e:  # reported on the training thread at the next vote
                written["error"] = f"{type(e).__name__}: {e}"
            finally:
                shutil.rmtree(local, ignore_errors=True)

        self._written = written
        self._thread = threading.Thread(target=write, daemon=True, name="openclaw-async-checkpoint")
        self._thread.start()
