"""Saving checkpoints from the training loop (worker process), synchronously or in the background
(`checkpoint.async`), whole (rank 0 writes: DDP) or sharded (every rank writes its shards).

A synchronous save stalls training for the whole write: serialize, checksum, copy into storage, and
report to Ray Train. An asynchronous save stalls it only for a snapshot to host memory; threads write,
checksum and publish the files straight into the run's storage folder. Every rank must then report
the checkpoint to Ray Train at the same step: each rank's "still writing" flag rides on the per-step
vote (`stops.StopSignals`), and the ranks report at the first step where no rank is still writing.
The manifest, listing every file of every rank, is written last, by rank 0, when the checkpoint is
reported. Metrics are published with the checkpoint that covers them.

The final checkpoint and the checkpoint of a stop are always synchronous: they must be durable before
the workers return or exit.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import ray.train
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from openclaw.config import Config
from openclaw.data.filesystems import storage_filesystem, storage_uri
from openclaw.engine import checkpoint as ckpt_io
from openclaw.engine.sharded import SHARDS_DIR, async_save_shards, save_shards
from openclaw.errors import CheckpointError
from openclaw.tracking.redact import redacted
from openclaw.runtime.checkpoint_store import (checkpoint_dir_name, files_under, publish, publish_dir,
                                               publish_manifest, to_host)
from openclaw.runtime.staging import new_staging_dir, remove_stale, staging_dir


def should_save(step: int, cfg: Config) -> bool:
    return step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def background_group(sharded: bool, background: bool):
    """The process group a sharded background save runs its own collectives on: never the training's, and
    one with a CPU backend (gloo), which torch's async save needs. At one worker too: there a GPU's
    default group is NCCL alone, and every save failed ("A CPU backend must be enabled for async save")."""
    if sharded and background and dist.is_available() and dist.is_initialized():
        return dist.new_group(backend="gloo")
    return None


class Saver:
    """Saves for one training loop. Every rank calls `save` and `report_ready` at the same steps."""

    def __init__(self, engine, state, tracker, config: dict, rank: int, run_dir: str, background: bool):
        self.engine, self.state, self.tracker = engine, state, tracker
        self.config = redacted(config)  # what checkpoints keep: the model's config, never a credential
        self.rank, self.run_dir, self.background = rank, run_dir, background
        self.sharded = engine.strategy.sharded
        remove_stale()  # what a killed worker of this node left in the middle of a save
        self.fs, self.root = storage_filesystem(run_dir)
        self._group = background_group(self.sharded, background)
        self._thread: threading.Thread | None = None
        self._written: dict[str, Any] = {}   # this rank's background write: {"files", "error"}
        self._outstanding: dict[str, Any] | None = None  # every rank: {"step", "stall_s", "path", "metrics"}
        self._completed: list[tuple[int, float]] = []

    # ---- the per-step vote -------------------------------------------------------------------

    def writing(self) -> int:
        """1 while this rank's background write runs: what this rank votes."""
        return int(self._thread is not None and self._thread.is_alive())

    def written(self, any_writing: bool) -> bool:
        """Whether the background checkpoint is complete on every rank, by the step's vote."""
        return self._outstanding is not None and not any_writing

    def report_ready(self) -> None:
        """Every rank, at the step the vote said no rank is still writing: report the checkpoint."""
        t0, out = time.perf_counter(), self._outstanding
        if self._thread is not None:
            self._thread.join()
        files = self._gather(self._written)
        if self.rank == 0 and self.sharded:
            publish_manifest(self.fs, out["path"], out["step"], ckpt_io.SHARDED, files)
        self._report(out["step"], out["metrics"], out["path"], mode="async")
        self._completed.append((out["step"], out["stall_s"] + time.perf_counter() - t0))
        self._thread, self._written, self._outstanding = None, {}, None

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
        if self.rank == 0:
            self.state.pending_metrics = self.tracker.pending()
        if self.background and not final:
            self._begin_background(metrics)
            self._outstanding["stall_s"] = time.perf_counter() - t0
        else:
            self._save_now(metrics)
            self._completed.append((self.state.step, time.perf_counter() - t0))

    def _save_now(self, metrics: dict[str, float]) -> None:
        if self.sharded:
            dest = f"{self.root.rstrip('/')}/{self._agreed_name()}"
            with staging_dir() as d:
                save_shards(self.engine.state_dict(), f"{d}/{SHARDS_DIR}")
                files = self._gather({"files": self._publish_shards(d, dest)})
            if self.rank == 0:
                publish_manifest(self.fs, dest, self.state.step, ckpt_io.SHARDED, files)
            self._report(self.state.step, metrics, dest, mode="sync")
            return
        # Published by rank 0 as a background save is, manifest last: Ray's upload copied the folder's files
        # in parallel, and a worker killed in it left a manifest beside a missing model.pt, which the
        # listings (`checkpoint list`, retention, the resume's config check) took for a finished checkpoint.
        dest = None
        if self.rank == 0:
            es = self.engine.state_dict()
            with staging_dir() as d:
                ckpt_io.save(d, model=es["model"], trainer={k: v for k, v in es.items() if k != "model"},
                             state=self.state.state_dict(), config=self.config)
                dest = publish_dir(d, self.run_dir)
        self._report(self.state.step, metrics, dest, mode="sync")

    def _begin_background(self, metrics: dict[str, float]) -> None:
        dest = f"{self.root.rstrip('/')}/{self._agreed_name()}" if self.sharded else None
        self._outstanding = {"step": self.state.step, "stall_s": 0.0, "path": dest, "metrics": dict(metrics)}
        if self.sharded:
            local = new_staging_dir()
            future = async_save_shards(self.engine.state_dict(), f"{local}/{SHARDS_DIR}", self._group)
            small = self._small_parts() if self.rank == 0 else None
            self._start(lambda: self._finish_shards(future, local, dest, small))
        elif self.rank == 0:
            snapshot, state, config = to_host(self.engine.state_dict()), dict(self.state.state_dict()), self.config
            self._start(lambda: self._write_whole(snapshot, state, config))

    def _start(self, write) -> None:
        def run() -> None:
            try:
                write()
            except Exception as e:  # reported on the training thread when the checkpoint is
                self._written["error"] = f"{type(e).__name__}: {e}"
        self._thread = threading.Thread(target=run, daemon=True, name="openclaw-async-checkpoint")
        self._thread.start()

    def _write_whole(self, snapshot: dict, state: dict, config: dict) -> None:
        local = new_staging_dir()
        try:
            ckpt_io.save(local, model=snapshot["model"], state=state, config=config,
                         trainer={k: v for k, v in snapshot.items() if k != "model"})
            self._outstanding["path"] = publish_dir(local, self.run_dir)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def _finish_shards(self, future, local: str, dest: str, small: dict | None) -> None:
        try:
            future.result()
            if small is not None:
                ckpt_io.save_small(Path(local), **small)
            self._written["files"] = self._publish_shards(local, dest, write_small=False)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    # ---- the pieces ----------------------------------------------------------------------------

    def _small_parts(self) -> dict[str, Any]:
        return {"trainer": {"scaler": self.engine.scaler.state_dict()}, "state": dict(self.state.state_dict()),
                "config": self.config}

    def _publish_shards(self, local: str, dest: str, write_small: bool = True) -> dict[str, dict]:
        """This rank's shards (and rank 0's small files) into `dest`; their manifest entries."""
        if self.rank == 0 and write_small:
            ckpt_io.save_small(Path(local), **self._small_parts())
        return publish(local, files_under(local), self.fs, dest)

    def _agreed_name(self) -> str:
        """Collective: rank 0's name for the new checkpoint folder."""
        name = [checkpoint_dir_name()]
        if _distributed():
            dist.broadcast_object_list(name, src=0)
        return name[0]

    def _gather(self, written: dict[str, Any]) -> dict[str, dict]:
        """Collective for sharded saves: every rank's files (or errors), at rank 0."""
        results = [written]
        if self.sharded and _distributed():
            results = [None] * dist.get_world_size()
            dist.all_gather_object(results, written)
        errors = [r["error"] for r in results if r and "error" in r]
        if errors:
            raise CheckpointError(f"the background checkpoint of step {self._outstanding['step']} failed: {errors[0]}")
        return {name: info for r in results for name, info in (r or {}).get("files", {}).items()}

    def _report(self, step: int, metrics: dict, path: str, mode: str) -> None:
        checkpoint = Checkpoint(path, filesystem=self.fs) if self.rank == 0 else None
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        self._after_report(step, path, mode)

    def _after_report(self, step: int, path: str, mode: str) -> None:
        self.tracker.publish(through_step=step)
        self.tracker.event("checkpoint", step=step, world_size=self.state.world_size, mode=mode,
                           checkpoint=storage_uri(self.run_dir, path))
