"""Everything checked and prepared before any worker starts (driver): data paths, columns, transforms,
import paths and row counts, then the data preparation itself. A problem raises a `UserError` that
names what to fix."""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Any

import torch

from openclaw import constants
from openclaw.config import Config
from openclaw.data.prep import Prepared, check_transforms, prepare
from openclaw.data.sources import Source, check_columns, resolve
from openclaw.engine.models import build_model, build_on_meta
from openclaw.engine.parallel.layout_checks import check_layout
from openclaw.errors import ConfigError, DataError
from openclaw.user_code import import_path


def preflight(config: Config) -> dict[str, Source]:
    """Check data paths, columns, transforms and import paths; raise a `UserError` naming what to fix."""
    d = config.data
    sources = {"train": resolve(d.train, "data.train", d.s3, d.on_bad_shard)}
    if d.val:
        sources["val"] = resolve(d.val, "data.val", d.s3, d.on_bad_shard)
    for source in sources.values():
        schema = check_transforms(source, d) if d.transforms else source.schema
        check_columns(dataclasses.replace(source, schema=schema), d.features, d.label)
    if config.task != "language_modeling" and d.label is None and ":" not in config.task:
        raise ConfigError("`data.label` is unset but `task` is classification; set `data.label` to the target column.")
    if ":" in config.task:
        import_path(config.task, "task")
    check_model_layout(config)
    for line in config.parallelism.unused_settings():
        print(f"openclaw: note: {line}", flush=True)
    if config.train.record_samples and "://" in config.checkpoint.storage:
        raise ConfigError("`train.record_samples` writes next to the checkpoints and needs a local "
                          "`checkpoint.storage`; turn it off or use a local folder.")
    check_rows(sources["train"], config)
    check_storage(config)
    return sources


def check_model_layout(config: Config) -> None:
    """The model, built on the meta device, can take the layout `parallelism` asks for (heads and widths
    divisible by `tensor`, enough blocks for `pipeline`); a `ConfigError` names the key if not."""
    check_layout(model_on_meta(config), config.parallelism, builtin_task=":" not in config.task)


def model_on_meta(config: Config) -> torch.nn.Module:
    """The model, built on the meta device: a user's is imported and its kwargs checked, with no memory for
    its weights, whatever its size (a model that cannot be built there is built for real)."""
    model = build_on_meta(config.model.name, config.model.kwargs)
    return build_model(config.model.name, config.model.kwargs) if model is None else model


def check_storage(config: Config) -> None:
    """A local `checkpoint.storage` must be a folder this process can create and write in; found here, not
    when the run opens, after Ray started and the data was prepared. (A URI is reached when the run opens.)"""
    if "://" in config.checkpoint.storage:
        return
    folder = storage_path(config)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".openclaw-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"`checkpoint.storage` {folder} cannot be written ({e.strerror or e}): set it to a folder "
                          f"you can write in, or to a URI such as s3://bucket/runs.") from None


def check_rows(train: Source, config: Config) -> None:
    if train.num_rows < config.train.global_batch_size:
        raise DataError(f"`data.train` has {train.num_rows} rows, fewer than one global batch "
                        f"(`train.global_batch_size` = {config.train.global_batch_size}). Lower the batch size.")


def tracking_uri(config: Config) -> str:
    return config.tracking.uri or constants.default_tracking_uri()


def storage_path(config: Config) -> str:
    s = config.checkpoint.storage
    return s if "://" in s else os.path.abspath(os.path.expanduser(s))


def prepare_data(config: Config, sources: dict[str, Source], storage: str) -> tuple[dict[str, Prepared], Any]:
    """Prepare (or find in the cache) what training reads, and say so. A bad shard stops the job here."""
    prepared, cache = prepare(sources, config.data, storage)
    for name, p in prepared.items():
        if p.cache != "off":
            how = ("found in the cache" if p.cache == "hit" else f"prepared in {p.prepare_s:.1f} s")
            print(f"openclaw: data.{name}: {p.source.num_rows} rows in {len(p.source.shards)} shard(s), {how} "
                  f"({p.source.spec})", flush=True)
        if p.source.skipped:
            print(f"openclaw: data.{name}: skipped {len(p.source.skipped)} bad shard(s) (`data.on_bad_shard: skip`): "
                  + "; ".join(why for _, why in p.source.skipped), file=sys.stderr, flush=True)
    check_rows(prepared["train"].source, config)
    return prepared, cache
