"""Which schema a dataset's shards share, and how a shard's differs from it (driver, when resolving).

Shards are compared by their columns' names and types, not by nullability: Spark writes columns and
list values declared non-nullable beside pyarrow's nullable ones, and the nulls themselves are refused
where training reads them (`sources.check_columns` from the footers, `sources.column_to_numpy` at read
time). The reference is the schema most readable shards share, not the first shard's: one odd shard
sorting first made every good one "bad", and `on_bad_shard: skip` then trained on the odd one alone.
"""
from __future__ import annotations

from collections import Counter

import pyarrow as pa


def reference(schemas: list[pa.Schema | None]) -> tuple[int | None, str]:
    """Of the shards' schemas (None where a footer is unreadable): the index of the first whose `columns`
    most readable shards share (ties: the first), and how many do, for messages ("4 of 5 readable shards
    share"); (None, "") when none is readable."""
    keys = [None if s is None else columns(s) for s in schemas]
    counts = Counter(k for k in keys if k is not None)  # (`keys.count` per shard: minutes at 50,000 shards)
    if not counts:
        return None, ""
    ref = next(i for i, k in enumerate(keys) if counts.get(k) == max(counts.values()))
    return ref, f"{counts[keys[ref]]} of {sum(counts.values())} readable shards share"


def columns(schema: pa.Schema) -> tuple[tuple[str, str], ...]:
    """What the shards of a dataset must share: each column's name and `_kind`, in order."""
    return tuple((f.name, _kind(f.type)) for f in schema)


def _kind(t: pa.DataType) -> str:
    """A type as training reads it: without nullability, and without the name of a list's value field
    (`item`, or Spark's `element`), at any depth of lists."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_kind(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{'large_' if pa.types.is_large_list(t) else ''}list<{_kind(t.value_type)}>"
    return str(t)


def difference(ref: pa.Schema, other: pa.Schema) -> str:
    """Name the columns that differ from the reference's: missing, extra, or of another type."""
    parts = []
    for f in ref:
        if f.name not in other.names:
            parts.append(f"column {f.name!r} is missing")
        elif _kind(other.field(f.name).type) != _kind(f.type):
            parts.append(f"column {f.name!r} has type {other.field(f.name).type}, not {f.type}")
    parts += [f"column {n!r} is extra" for n in other.names if n not in ref.names]
    return "; ".join(parts or [f"its columns {_cols(other)} are not {_cols(ref)} (another order)"])


def _cols(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"
