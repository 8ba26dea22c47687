"""Capturing a profile in the training loop (worker process). `StepProfiler` wraps the steps
`profile.start_step` to `start_step + steps` with `torch.profiler.profile` on the chosen ranks; the
phases inside a step carry the `openclaw/<phase>` labels of `engine.engine.phase`. The attempt builds
one only when the config has a `profile` section: without one, nothing here runs.

The attempt calls `step_ends(done)` after each step's checkpoint; every rank counts the same steps, so
every rank reaches the gather at the end:

    done == start_step - 1     chosen ranks start the profiler (at the attempt's start if it starts
                               there), which warms up for a step (none when start_step is 0)
    every step after           the profiler's schedule advances: a profiled step is one whole iteration
                               of the loop (batch positions, data, step, vote, logging, evaluation, checkpoint)
    done == start_step + steps chosen ranks export their trace and summarize it; every rank sends its
                               summary or None to rank 0 (`gather_object` on the training's process
                               group), then its gzipped trace, which rank 0 takes one rank at a time
                               and writes as it comes; then rank 0 writes the report and the advice

An attempt that starts inside the window (a restart) profiles nothing; one that starts before it
profiles it again.

Rank 0 logs `profile/rank<r>.trace.json.gz` (open it in Perfetto or chrome://tracing), `summary.json`,
`advice.json` and `report.html` through the tracker; with tracking off it writes them to the run folder,
`<checkpoint.storage>/<name>/profile/`, and prints where.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import tempfile
from typing import Any

import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, schedule

from openclaw.advice.rules import advise
from openclaw.data.filesystems import storage_filesystem, storage_uri
from openclaw.engine.metrics import memory_capacity_bytes, peak_memory_bytes
from openclaw.engine.parallel.base import transformer_blocks
from openclaw.profiling.facts import facts_from
from openclaw.profiling.report import render
from openclaw.profiling.summary import RankSummary, summarize

log = logging.getLogger("openclaw")

FOLDER = "profile"


class StepProfiler:
    """One attempt's profile. Every rank builds one, and calls `step_ends` after each step's checkpoint."""

    def __init__(self, config: Any, engine: Any, tracker, run_dir: str, rank: int, world: int, done: int,
                 global_batch_size: int | None = None):
        """`config`: the run's `Config` (with a `profile` section); `engine`: the rank's `Engine` (its device,
        and the precision it trains in by the end of the profile); `done`: the steps done at the start."""
        self.config, self.p, self.engine, self.device = config, config.profile, engine, engine.device
        self.rank, self.world, self.run_dir, self.tracker = rank, world, run_dir, tracker
        self.global_batch_size = global_batch_size
        self.first = max(0, self.p.start_step - 1)
        self.last = self.p.start_step + self.p.steps
        self.chosen = rank in self.p.chosen(world)
        self.prof: profile | None = None
        self.began = self.finished = False
        self._trace: bytes | None = None
        self._begin(done)
        if done > self.first and rank == 0:  # resumed past the profile's warm-up: say so, not silence
            tracker.progress({"message": f"profile: this attempt starts after step {done}, past `profile.start_step` "
                                         f"({self.p.start_step}): it profiles nothing (an earlier attempt that ran "
                                         f"those steps logged their profile). Set `profile.start_step` to {done + 1} "
                                         f"or later to profile this run now."})

    def step_ends(self, done: int) -> None:
        """After a step's checkpoint (`done`: the steps done). At the end of the profile, every rank gathers."""
        if not self.began:
            self._begin(done)
        elif not self.finished:
            if self.prof is not None:
                self.prof.step()
            if done >= self.last:
                self.finished = True
                self._finish()

    def _begin(self, done: int) -> None:
        """The chosen ranks start the profiler before the warm-up step."""
        if done != self.first:
            return
        self.began = True  # on every rank: every rank takes part in the gather
        if self.chosen:
            on_gpu = self.device.type == "cuda"
            self.prof = profile(
                activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []),
                schedule=schedule(wait=0, warmup=self.p.start_step - self.first, active=self.p.steps, repeat=1),
                on_trace_ready=self._export, record_shapes=False, profile_memory=self.p.memory, with_stack=False)
            self.prof.start()

    def _export(self, prof: profile) -> None:
        with tempfile.TemporaryDirectory(prefix="openclaw-profile-") as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            with open(path, "rb") as f:
                self._trace = f.read()

    def _finish(self) -> None:
        try:
            mine = self._summarize()
        except Exception as e:  # every rank must reach the gather, whatever became of its trace
            log.warning("profile: rank %d could not export or summarize its trace (%s); the report leaves it out",
                        self.rank, str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            mine = None
        summary, trace = mine or (None, None)
        summaries = [s for s in gather_to_rank0(summary) if s is not None]
        if self.rank != 0:
            if trace is not None:
                send_to_rank0(trace)
            return
        if not summaries:
            log.warning("profile: no rank recorded a trace (the profiled steps were cut short); no report")
            return
        try:
            files = report_files(summaries, self.config, self.engine.precision, self.global_batch_size, self.world,
                                 len(transformer_blocks(self.engine.strategy.unwrap(self.engine.model))))
        except Exception as e:  # best effort: the traces are still worth having, and training goes on
            log.warning("profile: could not write the report (%s); logging the traces alone", e)
            files = {}
        self._deliver(files, traces_from_ranks(trace, [s.rank for s in summaries]))

    def _summarize(self) -> tuple[RankSummary, bytes] | None:
        """This rank's (summary, gzipped trace), None if it recorded none."""
        if self.prof is None:
            return None
        self.prof.stop()  # exports the trace now if the schedule did not get to it
        self.prof = None
        trace, self._trace = self._trace, None
        if trace is None:
            return None
        summary = summarize(json.loads(trace), rank=self.rank)
        on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by Ray Train (torch's convention)
        held = self.engine.state_bytes or {}  # measured at the first finite step
        summary.process = {"peak_memory_bytes": peak_memory_bytes(self.device),
                           "memory_capacity_bytes": memory_capacity_bytes(self.device, on_node,
                                                                         self.config.train.memory_budget_gb),
                           "state_bytes": sum(held.values()) if held else None,
                           "checkpoint_bytes": held.get("params", 0) + held.get("optimizer", 0) if held else None}
        return summary, gzip.compress(trace, compresslevel=6, mtime=0)

    def _deliver(self, files: dict[str, bytes], traces) -> None:
        """Rank 0: the traces one at a time as they arrive (`traces_from_ranks`), then the report's files:
        to the MLflow run through the tracker, or with tracking off to the run folder. A file that cannot
        be written is left out with a warning (storage away: not a failed run); every trace is still
        received, so no rank waits forever."""
        steps, ranks, failed = f"steps {self.p.start_step + 1}-{self.last}", [], []
        try:
            write = self._writer()
        except Exception as e:  # the run folder's storage is away: every file fails alike, below
            def write(path: str, data: bytes, error: Exception = e) -> None:
                raise error
        for rank, gz in traces:
            ranks.append(rank)
            failed += _written(write, f"{FOLDER}/rank{rank}.trace.json.gz", gz)
            del gz  # before the next one arrives
        for path, data in files.items():
            failed += _written(write, path, data)
        if failed:
            self.tracker.progress({"message": f"profile: could not write {', '.join(failed)}"})
            return
        if self.config.tracking.enabled:
            self.tracker.event("profile", first_step=self.p.start_step + 1, last_step=self.last,
                               ranks=ranks, report=f"{FOLDER}/report.html")
            where = f"{FOLDER}/report.html in the MLflow run's artifacts"
        else:
            where = storage_uri(self.run_dir, f"{storage_filesystem(self.run_dir)[1]}/{FOLDER}/report.html")
        log.info("profile of %s: %s", steps, where)
        self.tracker.progress({"message": f"profile of {steps}: {where}"})

    def _writer(self):
        """Where rank 0 writes a file of the profile: the tracker, or with tracking off the run folder."""
        if self.config.tracking.enabled:
            return self.tracker.artifact
        fs, root = storage_filesystem(self.run_dir)

        def write(path: str, data: bytes) -> None:
            fs.create_dir(f"{root}/{FOLDER}", recursive=True)
            with fs.open_output_stream(f"{root}/{path}", compression=None) as f:  # as they are: no .gz detection
                f.write(data)
        return write


def _written(write, path: str, data: bytes) -> list[str]:
    """`write(path, data)`; [] or, where it failed (storage away: a warning, not a failed run), [path]."""
    try:
        write(path, data)
        return []
    except Exception as e:
        log.warning("profile: could not write %s (%s)", path, e)
        return [path]


def gather_to_rank0(mine: Any) -> list[Any]:
    """Every rank's `mine` on rank 0 (in rank order), through the training's process group; every rank
    must call it. Elsewhere an empty list."""
    if not _distributed():
        return [mine]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, out, dst=0)
    return out or []


def send_to_rank0(data: bytes) -> None:
    """A rank's trace to rank 0, which takes it in its turn (`traces_from_ranks`)."""
    dist.send_object_list([data], dst=0)


def traces_from_ranks(mine: bytes | None, ranks: list[int]):
    """On rank 0: (rank, trace) of each of `ranks` in order, its own (`mine`) included, each received
    from its rank (`send_to_rank0`) only when the one before has been taken: rank 0 holds one rank's
    trace at a time, not every rank's at once (a profile of many GPU ranks is gigabytes of traces)."""
    for rank in ranks:
        if rank == 0:
            yield 0, mine
            continue
        got: list[Any] = [None]
        dist.recv_object_list(got, src=rank)
        yield rank, got[0]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def report_files(summaries: list[RankSummary], config: Any, precision: Any = None,
                 global_batch_size: int | None = None, world: int | None = None,
                 model_blocks: int | None = None) -> dict[str, bytes]:
    """The files of a profile beside the ranks' traces, by their path in the run: the summaries, the
    advice (the facts it read, and its recommendations) and the report."""
    facts = facts_from(summaries, config, precision=getattr(precision, "name", None),
                       tf32=getattr(precision, "tf32", None), global_batch_size=global_batch_size, world_size=world,
                       model_blocks=model_blocks)
    try:
        advice, failed = advise(facts), None
    except Exception as e:  # a rule's bug must not cost the report
        log.warning("profile: the advice rules failed (%s); the report has no recommendation", e)
        advice, failed = [], f"{type(e).__name__}: {e}"
    steps = len(summaries[0].steps)
    meta = {"run": config.name, "profiled steps": f"{config.profile.start_step + 1} to "
            f"{config.profile.start_step + steps} ({steps})", "ranks": ", ".join(str(s.rank) for s in summaries),
            "device": summaries[0].device.get("name") or summaries[0].device["type"],
            "precision": getattr(precision, "name", None) or config.train.precision}
    facts_out = {f.name: getattr(facts, f.name) for f in dataclasses.fields(facts) if f.name != "config"}
    files = {f"{FOLDER}/summary.json": json.dumps([s.as_dict() for s in summaries]).encode()}
    advice_out = {"facts": facts_out, "recommendations": [r.as_dict() for r in advice]}
    if failed:
        advice_out["error"] = failed
    files[f"{FOLDER}/advice.json"] = json.dumps(advice_out, default=str, indent=1).encode()
    files[f"{FOLDER}/report.html"] = render(summaries, advice, title=f"Profile of {config.name}", meta=meta).encode()
    return files
