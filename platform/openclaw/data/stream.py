"""Worker side: a dataset's shards streamed into tensors, indexed by sample id (the sampler picks the ids).

A worker holds only the shards it needs: the window the current step reads, and the next window, which
a background thread reads ahead while the step computes. Each shard is read with pyarrow, whole, as
the few columns training uses (from the node's shard cache when the data is remote), and turned into
one tensor per column without a Python loop. Row ids are the shards' rows in file order, so they do
not depend on the world size or on which worker read what.
"""
from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from openclaw.data.sources import Shard, column_to_numpy
from openclaw.errors import DataError
from openclaw.data.filesystems import filesystem_for, is_remote
from openclaw.data.shard_cache import ShardCache

Batch = dict[str, torch.Tensor]


def shard_specs(shards: Iterable[Shard]) -> list[dict[str, Any]]:
    """Shards as plain data, for the loop config that travels to the workers."""
    return [asdict(s) for s in shards]


class ShardedData:
    """Sample ids -> tensors, over a list of Parquet shards, with at most `max_resident` shards held."""

    def __init__(self, spec: str, shards: list[dict[str, Any]], features: str, label: str | None, *,
                 s3: Any = None, shard_cache: ShardCache | None = None, max_resident: int = 0, pin: bool = False):
        self.shards = [Shard(**s) for s in shards]
        self.fs, _ = filesystem_for(spec, s3)
        self.cache = shard_cache if is_remote(spec) else None
        self.columns = [features] + ([label] if label else [])
        self.features, self.label, self.pin = features, label, pin
        self.starts = np.concatenate([[0], np.cumsum([s.rows for s in self.shards])]).astype(np.int64)
        self.max_resident = max_resident if max_resident > 0 else len(self.shards)
        self._resident: OrderedDict[int, Future] = OrderedDict()  # shard -> its tensors, least recent first
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openclaw-shard-reader")
        self.read_s, self.rows_read, self.wait_s = 0.0, 0, 0.0
        self._rows_like: dict[str, tuple[str, tuple[int, ...], np.dtype]] = {}
        """Per column: the first shard read with rows, and its rows' shape and dtype (`_tensor`)."""

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_rows(self) -> list[int]:
        return [s.rows for s in self.shards]

    def batch(self, ids: np.ndarray) -> Batch:
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        order = np.argsort(which, kind="stable")  # the ids grouped by shard, each group in the ids' order
        grouped = which[order]
        cuts = np.flatnonzero(grouped[1:] != grouped[:-1]) + 1
        segments = [(int(grouped[a]), a, b) for a, b in zip([0, *cuts], [*cuts, len(ids)])]
        parts = {i: self._get(i) for i, _, _ in segments}  # held here even if trimmed meanwhile
        rows = torch.from_numpy(ids[order] - self.starts[grouped])
        back = None
        if len(segments) > 1:  # where each id's row landed in the grouped rows
            back = torch.empty(len(ids), dtype=torch.int64)
            back[torch.from_numpy(order)] = torch.arange(len(ids))
        out = {"x": self._gather([(parts[i][0], a, b) for i, a, b in segments], rows, back)}
        if self.label:
            out["y"] = self._gather([(parts[i][1], a, b) for i, a, b in segments], rows, back)
        return out

    def _gather(self, segments: list[tuple[torch.Tensor, int, int]], rows: torch.Tensor,
                back: torch.Tensor | None) -> torch.Tensor:
        """A batch's rows from each shard's own tensor (`segments`: the shard's tensor and the span of
        `rows` it gives), then put back in the ids' order (`back`), into one (pinned, on GPUs) batch
        tensor: no tensor of the shards joined, which held every resident row twice."""
        first = segments[0][0]
        shape, dtype = (len(rows), *first.shape[1:]), first.dtype
        grouped = torch.empty(shape, dtype=dtype, pin_memory=self.pin and back is None)
        for src, a, b in segments:
            torch.index_select(src, 0, rows[a:b], out=grouped[a:b])
        if back is None:
            return grouped
        return torch.index_select(grouped, 0, back, out=torch.empty(shape, dtype=dtype, pin_memory=self.pin))

    def prefetch(self, shards: Iterable[int], keep: Iterable[int] = ()) -> None:
        """Start reading these shards in the background (those not already held), within the memory bound,
        first letting go of the shards read longest ago that are neither these nor in `keep` (the window
        the steps read now). Without that, a full stream read ahead only the window after its first: every
        later window was read while the step waited."""
        shards = [int(i) for i in shards]
        wanted = [i for i in dict.fromkeys(shards) if i not in self._resident]
        if wanted:
            self._trim(keep={int(i) for i in keep} | set(shards), room_for=len(wanted))
        for i in wanted:
            if len(self._resident) < self.max_resident:
                self._resident[i] = self._pool.submit(self._read, i)

    def sequential(self, ids: np.ndarray, micro: int) -> Iterable[Batch]:
        """Batches of `micro` ids in order (evaluation), reading the next shard ahead."""
        for start in range(0, len(ids), micro):
            chunk = ids[start:start + micro]
            nxt = np.searchsorted(self.starts, chunk[-1], side="right")
            if nxt < len(self.shards):
                self.prefetch([nxt], keep=np.unique(np.searchsorted(self.starts, chunk, side="right") - 1))
            yield self.batch(chunk)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals

    def _get(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        fut = self._resident.get(i)
        if fut is None:
            self._trim(keep=set(), room_for=1)
            fut = self._resident[i] = self._pool.submit(self._read, i)
        self._resident.move_to_end(i)
        if not fut.done():  # the step waits for this read: it was not read ahead in time
            t0 = time.perf_counter()
            out = fut.result()
            self.wait_s += time.perf_counter() - t0
            return out
        return fut.result()

    def ingest_rows_per_s(self) -> float:
        """Rows read from storage into tensors per second of reading (the reader thread's rate)."""
        return self.rows_read / self.read_s if self.read_s else 0.0

    def take_wait_s(self) -> float:
        """Seconds steps waited on shard reads since the last call."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def _trim(self, keep: set[int], room_for: int = 0) -> None:
        for i in list(self._resident):
            if len(self._resident) + room_for <= self.max_resident:
                break
            if i not in keep and self._resident[i].done():
                del self._resident[i]

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        t0 = time.perf_counter()
        shard = self.shards[i]
        try:
            if self.cache is not None:
                body = self.cache.read(self.fs, shard.path, shard.size, shard.mtime_ns, shard.etag)
                table = pq.read_table(pa.BufferReader(body), columns=self.columns)
            else:
                table = pq.read_table(shard.path, columns=self.columns, filesystem=self.fs)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"shard {shard.path} could not be read ({' '.join(str(e).split())}). Re-create it, or set "
                            f"`data.on_bad_shard: skip` to check every shard before training and leave out "
                            f"the bad ones.") from None
        if table.num_rows != shard.rows:
            raise DataError(f"shard {shard.path} now has {table.num_rows} rows, not the {shard.rows} it had when "
                            f"the run started; a dataset must not change under a run.")
        x = self._tensor(table, self.features, shard)
        y = self._tensor(table, self.label, shard) if self.label else None
        self.read_s += time.perf_counter() - t0
        self.rows_read += shard.rows
        return x, y

    def _tensor(self, table: pa.Table, column: str, shard: Shard) -> torch.Tensor:
        """The column as one tensor, whose rows are shaped and typed as the first shard's read: a list column
        whose lengths differ only between shards shares one schema, and a batch mixing a 4-wide and a
        3-wide shard took its shape from the first and padded the other's rows with uninitialised memory."""
        try:
            arr = column_to_numpy(table.column(column))
        except (pa.ArrowException, ValueError) as e:
            raise DataError(f"shard {shard.path}, column {column!r}: cannot be read as a tensor ({e}).") from None
        if len(arr):  # an empty shard's lists have no width
            first, shape, dtype = self._rows_like.setdefault(column, (shard.path, arr.shape[1:], arr.dtype))
            if (shape, dtype) != (arr.shape[1:], arr.dtype):
                raise DataError(f"shard {shard.path}, column {column!r}: its rows are {arr.dtype} values of shape "
                                f"{arr.shape[1:]}, but those of shard {first} are {dtype} values of shape {shape}; "
                                f"every shard's rows must hold as many values of one type (pad the lists to one "
                                f"length, or write a fixed-size list).")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        with warnings.catch_warnings():  # Arrow's buffer is read-only: shard tensors are only ever read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
