"""Where a job's relative paths point (driver): the working folder, or, for a `ray job submit` job,
whose working folder is Ray's temporary copy of `--working-dir`, `$OPENCLAW_HOME` (~/openclaw).

Under a Ray job, runs, checkpoints, the prepared-data cache and the default MLflow store land in
`$OPENCLAW_HOME`, where they outlive the job (Ray deletes its copy of the working folder). A relative
data path (or glob) is looked up in the working folder first (data that travelled with the job) and
then in `$OPENCLAW_HOME`; git-ignored files, such as `datasets/`, never travel with `--working-dir`.
"""
from __future__ import annotations

import glob
import os

from openclaw import constants
from openclaw.config import Config, validate
from openclaw.errors import DataError


def place(config: Config) -> Config:
    """The config with its relative local paths made absolute, as above (unchanged outside a Ray job)."""
    if not constants.under_ray_job():
        return config
    raw, home = config.resolved(), constants.openclaw_home()
    raw["checkpoint"]["storage"] = _under(home, raw["checkpoint"]["storage"])
    if raw["data"]["cache"].get("dir"):
        raw["data"]["cache"]["dir"] = _under(home, raw["data"]["cache"]["dir"])
    uri = raw["tracking"].get("uri")
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raw["tracking"]["uri"] = f"sqlite:///{_under(home, uri.removeprefix('sqlite:///'))}"
    for key in ("train", "val"):
        if raw["data"].get(key):
            raw["data"][key] = _data_path(raw["data"][key], f"data.{key}", home)
    return validate(raw, source="the job's config")


def _under(home: str, path: str) -> str:
    if "://" in path or os.path.isabs(os.path.expanduser(path)):
        return os.path.expanduser(path)
    return os.path.join(home, path)


def _data_path(spec: str, key: str, home: str) -> str:
    if "://" in spec or os.path.isabs(os.path.expanduser(spec)):
        return spec
    shipped, kept = os.path.abspath(spec), os.path.join(home, spec)
    magic = glob.has_magic(spec)  # a glob (`data/*.parquet`): where it matches Parquet files, as the loader
    for base in (os.getcwd(), home):  # reads it (`data.sources`), under the base taken literally
        path = os.path.join(glob.escape(base) if magic else base, spec)
        if any(f.endswith(".parquet") for f in glob.glob(path, recursive=True)) if magic else os.path.exists(path):
            return path
    raise DataError(
        f"`{key}`: {spec} is neither in the job's working folder ({shipped}: `ray job submit --working-dir` leaves "
        f"out git-ignored files, such as datasets/) nor under $OPENCLAW_HOME ({kept}). Put the data there (e.g. "
        f"`python data/prepare.py digits --out {os.path.join(home, 'datasets', 'digits')}` on the head node), "
        f"or set `{key}` to an absolute path every node sees, or to an s3:// URI.")
