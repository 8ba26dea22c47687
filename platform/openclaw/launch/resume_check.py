"""What a resumed run may change in its config (driver process), checked before anything starts.

The same `name` and `checkpoint.storage` resume a run from its newest checkpoint, which keeps the
config it was trained with (`config.json`). The model, the task and the optimizer must stay as they
were: a checkpoint cannot load into another model, and another optimizer's state would not be its
own (a worker would fail on it at every attempt until the failure budget is spent). So must the seed
and the shuffle window: they fix the epoch's sample order, and another order from the saved position
on would train some of the epoch's samples twice and others never. So must the state's layout, whole
(DDP) or sharded (FSDP, tensor or pipeline parallelism): the checkpoint is written in it. Anything else
may change (a larger batch, a new learning rate, more steps): the run says what changed, and records it
in MLflow, whose params keep the values the run started with.
"""
from __future__ import annotations

import json
from typing import Any

from openclaw.config import Config
from openclaw.data.filesystems import storage_filesystem
from openclaw.engine import checkpoint as ckpt_io
from openclaw.engine.models import with_defaults
from openclaw.errors import ConfigError
from openclaw.runtime.checkpoint_store import newest_finished_file
from openclaw.tracking.redact import flatten, redacted

FIXED = ("model", "task", "train.optimizer.name", "seed", "data.shuffle_window_shards")
"""Keys (and the keys under them) a resumed run must keep."""


def is_fixed(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FIXED)


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{dotted key: (before, after)}` for each key whose value differs (pure). A key that only one side
    has counts under `FIXED` (a model argument added or dropped); elsewhere it is a key another openclaw
    version added, not a change."""
    b, a = flatten(before), flatten(after)
    keys = (b.keys() & a.keys()) | {k for k in b.keys() ^ a.keys() if is_fixed(k)}
    return {k: (b.get(k), a.get(k)) for k in sorted(keys) if b.get(k) != a.get(k)}


def changes_since_checkpoint(config: Config, run_dir: str) -> tuple[str, dict[str, tuple[Any, Any]]] | None:
    """(the checkpoint, what the config changes) when the run resumes from one, else None. Raises
    `ConfigError` where it changes a `FIXED` key."""
    try:
        found = newest_finished_file(run_dir, "config.json")
    except OSError:  # storage unreachable now: the run's own start says so, with Ray's retries
        return None
    if found is None:
        return None
    path, raw = found
    try:
        before = json.loads(raw)
    except ValueError:  # the worker's restore will judge this checkpoint
        return None
    now = json.loads(json.dumps(redacted(config.resolved()), default=str))  # as the checkpoint wrote it
    for side in (before, now):  # a default written out (or left out) builds the same model
        model = side.get("model") or {}
        model["kwargs"] = with_defaults(model.get("name", ""), model.get("kwargs") or {})
    _check_layout(config, run_dir, path)
    changes = config_changes(before, now)
    fixed = {k: v for k, v in changes.items() if is_fixed(k)}
    if fixed:
        said = "; ".join(f"`{k}` was {v[0]!r}, now {v[1]!r}" for k, v in fixed.items())
        raise ConfigError(f"run {config.name!r} would resume from {path}, trained with another model, task, "
                          f"optimizer or sample order: {said}. Set them back to resume it, or set a new `name` to "
                          f"start a new run.")
    return path, changes


def _check_layout(config: Config, run_dir: str, path: str) -> None:
    """A checkpoint written whole (DDP) resumes under a strategy that keeps the state whole, a sharded
    one under a sharded one: another refused it in every worker, attempt after attempt, until the failure
    budget was spent."""
    fs, _ = storage_filesystem(run_dir)
    try:
        with fs.open_input_stream(f"{path}/{ckpt_io.MANIFEST}") as f:
            fmt = json.loads(f.read()).get("format", ckpt_io.WHOLE)
    except (OSError, ValueError, AttributeError):  # the worker's restore will judge this checkpoint
        return
    if fmt in (ckpt_io.WHOLE, ckpt_io.SHARDED) and (fmt == ckpt_io.SHARDED) != config.parallelism.sharded_state:
        now = "sharded" if config.parallelism.sharded_state else "whole"
        raise ConfigError(f"run {config.name!r} would resume from {path}, written {fmt}, but its `parallelism` "
                          f"(strategy {config.parallelism.strategy!r}, tensor {config.parallelism.tensor}, pipeline "
                          f"{config.parallelism.pipeline}) keeps the state {now}. Resume with a layout that keeps it "
                          f"{fmt}, or set a new `name` to start a new run.")
