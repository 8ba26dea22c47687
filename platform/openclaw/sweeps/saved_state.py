"""Tune's saved state of a sweep, checked before a resume (driver process).

Tune writes its experiment state (`experiment_state-<driver start>.json`: which trials finished, the
search's progress) every few seconds and copies it into the sweep's storage, neither step atomically. A
driver killed while it writes (`ray job stop` SIGKILLs 3 s after its SIGTERM) leaves that file cut
short. Tune's restore then fails, logs the error and silently starts the whole sweep over, under the
same name and parent run. openclaw reads the newest state first: an incomplete one is moved aside
when an older one (of an earlier driver) reads whole, and is otherwise a clear error.
"""
from __future__ import annotations

import fnmatch
import json
import posixpath

import pyarrow.fs as pafs

from openclaw.data.filesystems import storage_filesystem
from openclaw.errors import CheckpointError

STATE_FILES = "experiment_state-*.json"
"""Tune's name for its experiment state files (`TuneController.CKPT_FILE_TMPL`), one per driver start."""
SESSION_FILES = ("basic-variant-state-{}.json", "searcher-state-{}.pkl", "search_gen_state-{}.json",
                 "callback-states-{}.pkl")
"""The other states a driver start saves under its session's name (the search algorithm's, the
searcher's and the callbacks'; `CKPT_FILE_TMPL` of each). Tune restores the newest of each kind on its
own: left beside an experiment state moved aside, a killed driver's searcher state went with an older
experiment state that knew none of the trials it had made, and the sweep waited on them for ever."""
INCOMPLETE_SUFFIX = ".incomplete"


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
