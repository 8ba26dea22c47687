"""Applying tracking ops to one MLflow run (tracking actor, and `openclaw sync-spool` on the driver), and
the spool file that keeps the ops a server did not take in time.

An op is a name and JSON-able arguments (`metrics`, `params`, `restore`, `event`, `attempt`, `artifact`, `end`,
`finish`);
`MlflowWriter.apply` carries one out. The tracking service applies them as they come; `sync_spool`
applies a spool file's, in order, later.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import hashlib
import tempfile
import time
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from openclaw.config import Config
from openclaw.errors import ConfigError
from openclaw.tracking.redact import public_uri
from openclaw.tracking.spool import read_spool
from openclaw.tracking.tracker import put_nowait

ATTEMPT_EVENTS = ("start", "resume", "restart", "resize")
EVENTS_DIR, EVENTS_FILE = "events", "events.json"


@contextlib.contextmanager
def no_progress_bars():
    """MLflow draws a progress bar per artifact it downloads (a run's event parts): none on a user's console."""
    name, before = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def read_events(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
    """A run's events, in order: its parts (`events/`), after the events of `events.json` from before its
    first part. Readers of a live run use this; `events.json` is written once the run is done, with every
    event then, so the parts repeat the rest of it. (A run from before parts, resumed, lost its first
    events: `events.json` was not read once a part was there.)"""
    parts = sorted(a.path for a in client.list_artifacts(run_id, EVENTS_DIR))
    whole = [a.path for a in client.list_artifacts(run_id) if a.path == EVENTS_FILE]
    events: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        # The parts in one download of their folder: a download per part costs a tracking server four
        # requests each (the run, its logged models, a listing, the file). Parts written since the listing
        # are left for the next read, so that the events stay a prefix of the run's in time order.
        with no_progress_bars():  # `openclaw.events()` drew one per part on the caller's stderr
            for folder in (EVENTS_DIR if parts else None, EVENTS_FILE if whole else None):
                if folder:
                    client.download_artifacts(run_id, folder, d)  # lands at d/<its path>
        for name in parts:
            with open(os.path.join(d, name)) as f:
                events += json.load(f)
        if whole:
            with open(os.path.join(d, EVENTS_FILE)) as f:
                before = [e for e in json.load(f) if not events or e["t"] < events[0]["t"]]
            events = before + events
    return events


class MlflowWriter:
    """Applies ops to one MLflow run. Plain code, no Ray: the service's thread and `sync-spool` use it."""

    def __init__(self, tracking_uri: str, run_id: str, progress=None, trust_code: bool = True):
        """`trust_code`: a spooled run's `finish` may build the `module:function` model its config names
        (`openclaw sync-spool --trust-code`); the service's own runs always may."""
        self.client, self.run_id, self.progress = MlflowClient(tracking_uri), run_id, progress
        self.uri, self.trust_code = tracking_uri, trust_code
        self._events: list[dict[str, Any]] | None = None
        self._unwritten = False
        self._published_through = 0
        self.attempts = 0
        """Attempts recorded by this writer's session: its first at the last size is a resume, a later one a
        restart."""

    def apply(self, op: str, *args: Any) -> None:
        getattr(self, f"_op_{op}")(*args)

    # ---- metrics -------------------------------------------------------------------------------

    def _op_metrics(self, metrics: list[dict[str, Any]]) -> None:
        # Steps at or before `_published_through` were published by an earlier attempt that ran past the
        # checkpoint this one resumed from (the newer one failed its check): they keep their first record.
        rows = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in metrics
                if m["step"] > self._published_through]
        for i in range(0, len(rows), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000], synchronous=True)

    def _op_restore(self, pending: list[dict[str, Any]]) -> None:
        """A resume: re-send the checkpoint's pending metrics (MLflow keeps one row per identical
        (key, step, value, timestamp)), then note how far the run's published record already goes."""
        self._published_through = 0
        self._op_metrics(pending)
        history = self.client.get_metric_history(self.run_id, "train/loss")
        self._published_through = max((m.step for m in history), default=0)

    def _op_params(self, params: dict[str, str]) -> None:
        """Params a worker resolved (`resolved/...`). MLflow keeps a param's first value: a later attempt's
        different value (a restart on other hardware) is in its event, not here."""
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        if new:
            self.client.log_batch(self.run_id, params=new, synchronous=True)

    def _op_artifact(self, path: str, data: str) -> None:
        """A file of the run (`Tracker.artifact`: its bytes in base64) at `path` among its artifacts; a retry
        writes the same file again."""
        folder, name = os.path.split(path)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, name), "wb") as f:
                f.write(base64.b64decode(data))
            self.client.log_artifact(self.run_id, os.path.join(d, name), folder or None)

    # ---- events --------------------------------------------------------------------------------

    def _op_event(self, kind: str, fields: dict[str, Any], t: float) -> None:
        self._op_events([[kind, fields, t]])

    def _op_events(self, batch: list[list]) -> None:
        """Events, appended as one part (`events/<time>.json`): an event never re-uploads the ones before it."""
        events = self.events()
        new = [{"event": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)), "t": round(t, 3),
                **fields} for kind, fields, t in batch]
        # Named by its content, so that a retry of this op writes the same part again, not a second one.
        digest = hashlib.sha1(json.dumps(new, sort_keys=True).encode()).hexdigest()[:10]
        self.client.log_dict(self.run_id, new, f"{EVENTS_DIR}/{int(batch[0][2] * 1e6):019d}-{digest}.json")
        self.client.set_tag(self.run_id, "openclaw.last_event", json.dumps(new[-1]))
        events.extend(new)
        self._unwritten = True

    def write_events_file(self) -> None:
        """All events in one file, `events.json`, once a run (or a late writer) is done appending."""
        if self._unwritten:
            self.client.log_dict(self.run_id, self.events(), EVENTS_FILE)
            self._unwritten = False

    def _op_attempts(self, count: int) -> None:
        """How many attempts the session whose ops follow (in a spool) had recorded before them: its next
        one at the same size is a restart, not a resume."""
        self.attempts = count

    def _op_attempt(self, fields: dict[str, Any], t: float) -> None:
        """A worker group started: record it as start, resume (a new driver), restart or resize."""
        sizes = [e["world_size"] for e in self.events() if e["event"] in ATTEMPT_EVENTS]
        previous = sizes[-1] if sizes else None
        world = fields["world_size"]
        if previous is None:
            cause = "start"
        elif previous != world:
            cause = "resize"
        else:
            cause = "resume" if self.attempts == 0 else "restart"
        self._op_event(cause, {**fields, "previous_world_size": previous}, t)
        self.attempts += 1  # once recorded: a retry of this op names it alike (and writes the same part)
        self._say(f"{cause} at step {fields['resumed_from_step']}/{fields['max_steps']} with {world} worker(s)"
                  f"{mesh_words(fields.get('mesh'))}, accumulation {fields['accumulation']}")

    # ---- the end of a run whose server was away (written to the spool by the driver) ----------------

    def _op_end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def _op_finish(self, config: dict[str, Any], checkpoint: str | None) -> None:
        """Log the final model (as the run would have) and close the run."""
        if checkpoint:
            # Imported here: logging a model needs torch, which the tracking actor otherwise never does,
            # and it starts at every run's start, beside the workers importing theirs.
            from openclaw.tracking.model import log_final_model, resolve_sources
            cfg = Config.model_validate(config)
            log_final_model(cfg, self.uri, self.run_id, checkpoint, resolve_sources(cfg.data), self.trust_code)
        self._op_end("FINISHED")

    def events(self) -> list[dict[str, Any]]:
        """The run's events so far (read once; errors, such as a server away, propagate: the op is retried)."""
        if self._events is None:
            self._events = read_events(self.client, self.run_id)
        return self._events

    def _say(self, message: str) -> None:
        if self.progress is not None:
            put_nowait(self.progress, {"message": message})


def mesh_words(mesh: dict[str, int] | None) -> str:
    """How the workers are laid out, for the start line (pure): `" (mesh shard 2 x tensor 2)"`, the mesh's
    dimensions above 1 in the config's names; nothing for plain data parallelism (every worker a replica)."""
    used = [(name, size) for name, size in (mesh or {}).items() if size > 1]
    if not used or [name for name, _ in used] == ["replicate"]:
        return ""
    return " (mesh " + " x ".join(f"{name} {size}" for name, size in used) + ")"


SYNCED = ".synced"
"""What a spool file is renamed with once `sync_spool` has applied every op in it."""


def sync_spool(path: str, tracking_uri: str | None = None, trust_code: bool = False) -> int:
    """Upload a spool file's ops in order (`openclaw sync-spool`). Returns how many were applied.

    The spool names the MLflow server it was written for; the server given (`tracking_uri`, else
    $MLFLOW_TRACKING_URI) must be that one: a spool's ops close and rewrite a run wherever they go."""
    (uri, run_id), ops = read_spool(path)
    if not ops:
        return 0
    target = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or uri
    if public_uri(target) != public_uri(uri):
        raise ConfigError(f"{path} was written for the MLflow server at {public_uri(uri)}, not {public_uri(target)} "
                          f"(`--tracking-uri`, else $MLFLOW_TRACKING_URI). Pass --tracking-uri {public_uri(uri)}, with "
                          f"its credentials in MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN.")
    writer = MlflowWriter(target, run_id, trust_code=trust_code)
    for item in ops:
        writer.apply(item["op"], *item["args"])
    writer.write_events_file()  # the run's events.json, as its own end would have written it
    os.replace(path, path + SYNCED)  # uploaded: not again (a model registered twice), and not in a resume's way
    return sum(item["op"] != "attempts" for item in ops)  # (a count the spool keeps is no update)
