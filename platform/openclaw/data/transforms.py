"""The `data.transforms` chain: built-in transforms and a user's own, over batches of numpy columns.

A batch is ``dict[str, numpy.ndarray]``: a scalar column is ``[N]``, a tensor (fixed-size list) column
``[N, D]``. Arrow tables convert to and from that form without a Python loop per row. The chain runs
inside Ray Data tasks (`openclaw.data.prep`); here it is plain functions, testable without Ray.
"""
from __future__ import annotations

import hashlib
import inspect
import sys
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from openclaw.data.sources import column_to_numpy
from openclaw.errors import ConfigError, DataError

Columns = dict[str, np.ndarray]

TRANSFORMS_VERSION = "1"
"""Part of every cache key: bump it when a built-in transform's output changes."""


def table_to_columns(table: pa.Table) -> Columns:
    return {name: column_to_numpy(table.column(name)) for name in table.column_names}


def columns_to_table(cols: Columns) -> pa.Table:
    """2-D arrays become fixed-size list (tensor) columns: one contiguous buffer each."""
    arrays = {}
    for name, arr in cols.items():
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(arr).reshape(-1)),
                                                             arr.shape[1])
        elif arr.ndim == 1:
            arrays[name] = pa.array(arr)
        else:
            raise DataError(f"transform output column {name!r} has shape {arr.shape}; columns must be 1-D (scalars) "
                            f"or 2-D (one tensor per row).")
    return pa.table(arrays)


def _need(cols: Columns, column: str, step: str) -> np.ndarray:
    if column not in cols:
        raise DataError(f"`data.transforms` {step}: column {column!r} is not in the data (columns: "
                        f"{', '.join(cols)}).")
    return cols[column]


def normalize(cols: Columns, t, step: str) -> Columns:
    x = _need(cols, t.column, step)
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"`data.transforms` {step}: column {t.column!r} has type {x.dtype}; normalize needs numbers.")
    return {**cols, t.column: ((x.astype(np.float32) - t.mean) / t.std).astype(np.float32)}


def tokenize_bytes(cols: Columns, t, step: str) -> Columns:
    """Concatenate the texts of the batch and cut them into windows of `seq_len + 1` bytes (the rest of
    the batch's bytes, less than one window, is dropped)."""
    texts = _need(cols, t.column, step)
    data = b"".join(v.encode() if isinstance(v, str) else bytes(v) for v in texts)
    n = len(data) // (t.seq_len + 1)
    tokens = np.frombuffer(data[:n * (t.seq_len + 1)], dtype=np.uint8).reshape(n, t.seq_len + 1)
    return {t.out: tokens.copy()}


def to_tensor(cols: Columns, t, step: str) -> Columns:
    names = [c for c in cols if t.prefix and c.startswith(t.prefix)] if t.prefix else list(t.columns)
    if not names:
        raise DataError(f"`data.transforms` {step}: no columns to stack (set `columns`, or a `prefix` that "
                        f"matches some of: {', '.join(cols)}).")
    parts = [_need(cols, c, step) for c in names]
    stacked = np.stack([p.astype(t.dtype) for p in parts], axis=1)
    rest = {k: v for k, v in cols.items() if k not in names}
    return {**rest, t.out: stacked}


def cast(cols: Columns, t, step: str) -> Columns:
    return {**cols, t.column: _need(cols, t.column, step).astype(t.dtype)}


BUILTINS: dict[str, Callable[[Columns, Any, str], Columns]] = {
    "normalize": normalize, "tokenize_bytes": tokenize_bytes, "to_tensor": to_tensor, "cast": cast}


def _user(t) -> Callable[[Columns], Columns]:
    from openclaw.user_code import import_path
    return import_path(t.fn, "data.transforms.fn")


def apply_chain(cols: Columns, transforms: list) -> Columns:
    """Run the configured transforms in order; an error names the transform (by position) that failed."""
    for i, t in enumerate(transforms):
        step = f"#{i} ({t.op})"
        if t.op == "map_batches":
            out = _user(t)(cols, **t.kwargs)
            if not isinstance(out, dict):
                raise DataError(f"`data.transforms` {step}: {t.fn} returned {type(out).__name__}; it must return "
                                f"a dict of column name -> numpy array.")
            cols = {k: np.asarray(v) for k, v in out.items()}
        else:
            cols = BUILTINS[t.op](cols, t, step)
    return cols


def apply_to_table(table: pa.Table, transforms: list) -> pa.Table:
    return columns_to_table(apply_chain(table_to_columns(table), transforms)) if transforms else table


def code_version(transforms: list) -> str:
    """A digest of the code the chain runs: the built-ins' version, and each user function's module source."""
    h = hashlib.sha256(TRANSFORMS_VERSION.encode())
    for t in transforms:
        if t.op == "map_batches":
            fn = _user(t)
            module = sys.modules.get(getattr(fn, "__module__", ""), None)
            try:
                source = inspect.getsource(module) if module else inspect.getsource(fn)
            except (OSError, TypeError) as e:
                raise ConfigError(f"`data.transforms` {t.fn}: cannot read its source for the cache key ({e}).") from None
            h.update(source.encode())
    return h.hexdigest()[:16]
