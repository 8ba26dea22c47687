"""Tune's saved state of a sweep, checked before a resume (driver process).

Tune writes its experiment state (`experiment_state-<driver start>.json`: which trials finished, the
search's progress) every few seconds and copies it into the sweep's storage, neither step atomically. A
driver killed while it writes (`ray job stop` SIGKILLs 3 s after its SIGTERM) leaves that file cut
short. Tune's restore then fails, logs the error and silently starts the whole sweep over, under the
same name and parent run. openclaw reads the newest state first: an incomplete one is moved aside
when an older one (of an earlier driver) reads whole, and is otherwise a clear error.

Tune's state keeps the search as it started (its trial count, metric, scheduler and space); the
`sweep:` section it started from is kept beside it (`SWEEP_FILE`), and a resume must bring the same.
"""
from __future__ import annotations

import fnmatch
import json
import posixpath

import pyarrow.fs as pafs

from openclaw.data.filesystems import storage_filesystem
from openclaw.errors import CheckpointError, ConfigError
from openclaw.tracking.redact import flatten

STATE_FILES = "experiment_state-*.json"
"""Tune's name for its experiment state files (`TuneController.CKPT_FILE_TMPL`), one per driver start."""
SESSION_FILES = ("basic-variant-state-{}.json", "searcher-state-{}.pkl", "search_gen_state-{}.json",
                 "callback-states-{}.pkl")
"""The other states a driver start saves under its session's name (the search algorithm's, the
searcher's and the callbacks'; `CKPT_FILE_TMPL` of each). Tune restores the newest of each kind on its
own: left beside an experiment state moved aside, a killed driver's searcher state went with an older
experiment state that knew none of the trials it had made, and the sweep waited on them for ever."""
INCOMPLETE_SUFFIX = ".incomplete"
SWEEP_FILE = "openclaw_sweep.json"
"""The `sweep:` section a sweep started with, beside Tune's state."""


def keep_sweep_section(exp_path: str, section: dict) -> None:
    """Note the `sweep:` section (plain data) a sweep starts with, for its resumes to compare with."""
    fs, root = storage_filesystem(exp_path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(posixpath.join(root, SWEEP_FILE)) as f:
        f.write(json.dumps(section, sort_keys=True).encode())


def check_same_sweep(exp_path: str, section: dict) -> None:
    """Refuse a resume whose `sweep:` section is not the one the sweep started with: Tune restores its
    search as it was, so an edit took only in part (`num_samples: 12` printed 12 trials and ran 6; another
    `metric` named a best trial with no value, and the CLI failed after the whole sweep). A sweep from
    before `SWEEP_FILE` is not compared."""
    fs, root = storage_filesystem(exp_path)
    try:
        with fs.open_input_stream(posixpath.join(root, SWEEP_FILE)) as f:
            kept = json.loads(f.readall())
    except FileNotFoundError:
        return
    plain = json.loads(json.dumps(section))
    before, now = (flatten({k: v for k, v in side.items() if k != "space"}) for side in (kept, plain))
    # Keys on both sides: one on a side alone is a key another openclaw version has (`resume_check` alike);
    # the space is the user's own, whole.
    changed = {k: (before[k], now[k]) for k in sorted(before.keys() & now.keys()) if before[k] != now[k]}
    if kept.get("space") != plain.get("space"):
        changed["space"] = (kept.get("space"), plain.get("space"))
    if changed:
        said = ", ".join(f"sweep.{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume continues the search Tune saved, as it started, but the `sweep:` section "
                          f"changed since: {said}. Put it back to resume, or start a new sweep under another "
                          f"`name`.")


def _reads_whole(fs: pafs.FileSystem, path: str) -> bool:
    try:
        with fs.open_input_stream(path) as f:
            state = json.loads(f.readall())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "trial_data" in state and "runner_data" in state


def check_saved_state(exp_path: str, sweep_name: str) -> str | None:
    """Before `Tuner.restore(exp_path)`: make Tune's newest experiment state one that reads whole. Returns
    a line to print where an incomplete newer one was moved aside (None where nothing was wrong); raises
    CheckpointError where no state reads whole."""
    fs, root = storage_filesystem(exp_path)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    states = sorted((i.path for i in infos if fnmatch.fnmatch(posixpath.basename(i.path), STATE_FILES)),
                    key=posixpath.basename)
    incomplete, whole = [], None
    for path in reversed(states):
        if _reads_whole(fs, path):
            whole = path
            break
        incomplete.append(path)
    if states and whole is None:
        raise CheckpointError(
            f"Tune's saved state of sweep {sweep_name!r} ({posixpath.basename(states[-1])} in {exp_path}) is "
            f"incomplete: its driver was killed while writing it, and no earlier state reads whole. The "
            f"finished trials stay in MLflow; start the sweep again under another `name` (or remove "
            f"{exp_path}), without --resume.")
    if not incomplete:
        return None
    names = {posixpath.basename(i.path) for i in infos}
    for path in incomplete:  # Tune reads the newest by name: after the move, the whole one is the newest
        fs.move(path, path + INCOMPLETE_SUFFIX)
        session = posixpath.basename(path)[len("experiment_state-"):-len(".json")]
        for sibling in (t.format(session) for t in SESSION_FILES):
            if sibling in names:
                fs.move(posixpath.join(posixpath.dirname(path), sibling),
                        posixpath.join(posixpath.dirname(path), sibling + INCOMPLETE_SUFFIX))
    return (f"openclaw: Tune's newest saved state of sweep {sweep_name!r} is incomplete (its driver was killed "
            f"while writing it), kept as {posixpath.basename(incomplete[0])}{INCOMPLETE_SUFFIX}; resuming from "
            f"{posixpath.basename(whole)}, saved earlier.")
