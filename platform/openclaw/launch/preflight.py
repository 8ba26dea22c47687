"""Everything checked and prepared before any worker starts (driver): data paths, columns, transforms,
import paths and row counts, then the data preparation itself. A problem raises a `UserError` that
names what to fix."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from openclaw import constants
from openclaw.config import Config
from openclaw.data.prep import Prepared, check_transforms, prepare
from openclaw.data.sources import Source, check_columns, resolve
from openclaw.engine.models import BUILTIN, build_model, build_on_meta
from openclaw.engine.parallel.layout_checks import check_layout
from openclaw.runtime.evaluate import eval_rows
from openclaw.tracking.run import check_param_keys, check_tracking_uri
from openclaw.errors import ConfigError, DataError
from openclaw.user_code import import_path


def preflight(config: Config, *, checks: tuple[Callable[[dict[str, Source]], None], ...] = ()) -> dict[str, Source]:
    """Check data paths, columns, transforms and import paths; raise a `UserError` naming what to fix.
    `checks`: the caller's own checks of the sources (a sweep's space), run before anything is written."""
    d = config.data
    sources = {"train": resolve(d.train, "data.train", d.s3, d.on_bad_shard)}
    if d.val:
        sources["val"] = resolve(d.val, "data.val", d.s3, d.on_bad_shard)
    for source in sources.values():
        schema = check_transforms(source, d) if d.transforms else source.schema
        if config.task == "language_modeling" and d.label is not None and d.label not in schema.names:
            raise DataError(f"`data.label`: column {d.label!r} is not in {source.spec}, and language modeling needs "
                            f"none: it takes its targets from `data.features` (each row's tokens shifted by one). "
                            f"Set `data.label: null`.")
        check_columns(dataclasses.replace(source, schema=schema), d.features, d.label,
                      nulls=not d.transforms)  # (transformed: checked once prepared)
        if config.task == "classification" and hasattr(schema.field(d.label).type, "value_type"):
            raise DataError(f"`data.label`: column {d.label!r} in {source.spec} holds a list per row "
                            f"({schema.field(d.label).type}); classification scores one class id per row. Set "
                            f"`data.label` to the class column, or name a task of your own in `task`.")
    if config.task != "language_modeling" and d.label is None and ":" not in config.task:
        raise ConfigError("`data.label` is unset but `task` is classification; set `data.label` to the target column.")
    if ":" in config.task:
        import_path(config.task, "task")
    model = model_on_meta(config)  # one build for the layout and the value checks
    check_model_layout(config, model)
    for line in config.parallelism.unused_settings() + config.notes():
        print(f"openclaw: note: {line}", flush=True)
    if config.train.record_samples and "://" in config.checkpoint.storage:
        raise ConfigError("`train.record_samples` writes next to the checkpoints and needs a local "
                          "`checkpoint.storage`; turn it off or use a local folder.")
    check_rows(sources["train"], config)
    check_eval_rows(sources.get("val"), config)
    if not d.transforms:  # else the prepared data is checked, once prepared
        check_value_ranges(config, sources, model)
    for check in checks:
        check(sources)
    check_storage(config)
    if config.tracking.enabled:
        check_param_keys(config)
        check_tracking_uri(tracking_uri(config), "tracking.uri" if config.tracking.uri else "$MLFLOW_TRACKING_URI")
    return sources


def check_model_layout(config: Config, model: torch.nn.Module | None = None) -> None:
    """The model, built on the meta device (`model`, or built here), can take the layout `parallelism` asks
    for (heads and widths divisible by `tensor`, enough blocks for `pipeline`); a `ConfigError` names the
    key if not."""
    check_layout(model_on_meta(config) if model is None else model, config.parallelism,
                 builtin_task=":" not in config.task)


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


def check_eval_rows(val: Source | None, config: Config) -> None:
    """Every data-parallel rank scores at least one validation row: an evaluation shares the rows out, and
    under FSDP each rank runs as many forwards as the one with the most, again over its own last rows."""
    dp = max(config.worlds) // config.parallelism.model_parallel
    rows = eval_rows(val.num_rows, config) if val is not None else 0
    if 0 < rows < dp:
        raise DataError(f"an evaluation scores {rows} row(s) of `data.val`, fewer than the "
                        f"{dp} data-parallel ranks it is shared out over: raise `train.eval_rows`, or use a larger "
                        f"`data.val`.")


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
    check_eval_rows(prepared["val"].source if "val" in prepared else None, config)  # as prepared: fewer, maybe
    if config.data.transforms:
        check_value_ranges(config, {name: p.source for name, p in prepared.items()})
    return prepared, cache


def check_value_ranges(config: Config, sources: dict[str, Source], model: torch.nn.Module | None = None) -> None:
    """Token ids (language modeling) or class labels (classification) the model cannot score: an id at or
    past its output's width (or its embedding's rows) fails the first step in every worker, one retry
    after another. The values' range comes from the shards' footers (`Source.value_range`), the width
    from a forward of the model on the meta device (`model`, or built here); either unknown, nothing is
    checked. A float column's range with a fraction at either end is refused whatever the width: the
    loss would cut each value to a whole number."""
    if config.task not in ("language_modeling", "classification"):
        return
    column, key = (config.data.features, "data.features") if config.task == "language_modeling" else \
        (config.data.label, "data.label")
    width = output_width(config, sources["train"], model)
    what = "token ids" if config.task == "language_modeling" else "labels"
    ignored = -100 if config.task == "classification" else 0  # the cross-entropy's `ignore_index`
    for name, source in sources.items():
        span = source.value_range(column)
        if span is not None and not all(float(v).is_integer() for v in span):
            low, high = (v + 0.0 for v in span)  # (+ 0.0: a footer's -0.0, Parquet's least zero, reads as 0)
            raise DataError(f"`data.{name}`: column {column!r} (`{key}`) holds {what} from {low:g} to {high:g}: "
                            f"{what} must be whole numbers, and a fraction would be cut off without a word. Make the "
                            f"column whole numbers (integers), or name a task of your own in `task` for other targets.")
        span = span and (int(span[0]), int(span[1]))
        if span is None or width is None or (span[0] >= 0 or span[0] == ignored) and span[1] < width[0]:
            continue
        fix = f"Set {width[2]} to at least {span[1] + 1}" if span[1] >= width[0] else \
            f"A negative {what[:-1]} scores nothing" + (" (but -100, which the loss ignores)" if ignored else "")
        raise DataError(f"`data.{name}`: column {column!r} (`{key}`) holds {what} from {span[0]} to {span[1]}, but "
                        f"the model's {width[1]} is {width[0]}: {what} must lie in 0..{width[0] - 1}. {fix}, or "
                        f"check the data.")


def output_width(config: Config, source: Source, model: torch.nn.Module | None = None) -> tuple[int, str, str] | None:
    """How many token ids or classes the model scores, what says so, and the key to change: the width of
    its output on a batch of two rows shaped as the data's, built and run on the meta device, and for
    language modeling at most its first embedding's rows. None where it cannot run there. `model`: the
    model on the meta device, if the caller has built it (`model_on_meta`)."""
    from openclaw.engine.tasks import build_task
    columns = {"x": config.data.features, "y": config.data.label}
    try:
        inputs = build_task(config.task).split({k: meta_column(source.schema.field(c).type)
                                                for k, c in columns.items() if c})[0]
    except Exception:  # a ragged column: the first step is the check
        return None
    model = model_on_meta(config) if model is None else model
    try:
        with torch.no_grad():
            width = model(inputs).shape[-1]
    except ConfigError:
        raise
    except Exception as e:  # a user's model may read values, which the meta device does not hold
        builtin = config.model.name in BUILTIN
        if not (builtin or misfits_the_rows(e)):
            return None  # the workers' first step runs it on real rows
        hint = ""
        if config.model.name == "mlp":  # it flattens each row: a vector's width is its `in_features`
            hint = f" (`model.kwargs.in_features`: {math.prod(inputs.shape[1:])})" if inputs.dim() > 1 else \
                " (the mlp takes a vector per row: a fixed-size list column as `data.features`)"
        raise ConfigError(f"the {'built-in' if builtin else '`model.name`'} {config.model.name!r} cannot run on the "
                          f"data's rows (`data.features` {config.data.features!r}: {list(inputs.shape[1:])} per row, "
                          f"{inputs.dtype}): {type(e).__name__}: {str(e).splitlines()[0].rstrip('.')}. Make "
                          f"{'`model.kwargs`' if builtin else 'the model or `model.kwargs`'} fit the data{hint}.") from None
    kwarg = "vocab_size" if config.task == "language_modeling" else "num_classes"
    key = f"`model.kwargs.{kwarg}`" if kwarg in config.model.kwargs or config.model.name in BUILTIN else \
        f"{config.model.name}'s {'vocabulary' if kwarg == 'vocab_size' else 'classes'}"
    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if config.task == "language_modeling" and embedding is not None and embedding.num_embeddings < width:
        return embedding.num_embeddings, "first embedding's row count", key
    return width, "output width", key


_MISFIT = re.compile(r"shape|size|dimension|broadcast|channel|reduction dim|scalar type", re.IGNORECASE)
_META_ONLY = re.compile(r"meta|fake|data.dependent|device|cuda|process group", re.IGNORECASE)


def misfits_the_rows(error: BaseException) -> bool:
    """Whether a forward's error on the meta device says the model does not fit the data's rows (pure): a
    shape, width, rank or dtype that torch's checks refuse, which real rows of that shape would fail
    alike. Not so for what only the meta device cannot do (read a value, an op with no meta kernel) or
    what the driver lacks (a GPU, a process group): those the workers' first step runs on real rows."""
    message = str(error)
    return (isinstance(error, (RuntimeError, IndexError, ValueError, AssertionError))
            and not isinstance(error, NotImplementedError)
            and bool(_MISFIT.search(message)) and not _META_ONLY.search(message))


def meta_column(arrow_type) -> torch.Tensor:
    """Two rows of a column of this Arrow type, as a data batch holds them, on the meta device: a fixed-size
    list's rows `[2, D]`, a scalar's `[2]`."""
    size = (arrow_type.list_size,) if hasattr(arrow_type, "list_size") else ()
    base = arrow_type.value_type if size else arrow_type
    dtype = torch.from_numpy(np.zeros(0, dtype=base.to_pandas_dtype())).dtype
    return torch.empty((2, *size), dtype=dtype, device="meta")
