"""Ingest: rows/s delivered as torch batches into a Ray Train worker, against a raw pyarrow scan of the
same files in one process, measured in one run.

    python bench/ingest.py [--rows 2000000] [--repeats 5]

Two datasets: the issue's 2M x 33 float32 scalar columns in 8 shards, and token sequences (one
fixed-size uint8 column, 129 tokens per row). The worker side is openclaw's own path: the platform's
shuffled order (windows of shards), `ShardedData` reading shards ahead in a thread, batches of 1024 ids
gathered into tensors. Cases:
  - streaming: the token shards read straight from Parquet (one tensor column: no preparation);
  - cache hit: the scalar-column shards after the `to_tensor` transform, read from the prepared cache.
The raw side scans the column the worker trains on, in the same files, in file order (no shuffle,
batches of 1024): the token shards, and the prepared cache's shards (not the 33 source columns, which
would be more work).
A third side, Ray Data's `iter_torch_batches` over the same files and column (in the driver, its read
tasks on the local instance's 4 CPUs), shows why the workers do not read through Ray Data. The first two
sides decode with one pyarrow thread, as a Ray worker does (`ARROW_THREADS`). The preparation, done
once before, is timed and reported apart. The sides alternate (ABBA) over
`--repeats` rounds; medians, spreads (min-max) and the ratio of medians, openclaw / raw.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO.parent / "shared" / "anchors"))
from common import add_budget, alternate, summarize  # noqa: E402  (bench/ is this script's folder)

BATCH = 1024
ARROW_THREADS = 1
"""pyarrow's decoding threads, on both sides: a Ray worker's (Ray sets OMP_NUM_THREADS=1, which pyarrow
follows), where the driver's raw scan would otherwise use every core."""


def make_tokens(folder: Path, rows: int, shards: int = 8, seq: int = 129) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        n = rows // shards
        tokens = rng.integers(0, 256, size=(n, seq), dtype=np.uint8)
        col = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), seq)
        pq.write_table(pa.table({"x": col}), folder / f"part-{s:03d}.parquet", row_group_size=50_000)


def raw_rows_per_s(files: list[str], column: str) -> float:
    """A raw pyarrow scan of `column` (a fixed-size tensor column, the one the worker trains on), in file
    order, as [N, D] torch tensors of batches of 1024."""
    import torch
    pa.set_cpu_count(ARROW_THREADS)
    t, n = time.perf_counter(), 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=BATCH, columns=[column]):
            col = rb.column(0)
            x = torch.from_numpy(col.flatten().to_numpy().reshape(len(col), -1))
            n += len(x)
    return n / (time.perf_counter() - t)


def raydata_rows_per_s(files: list[str], column: str) -> float:
    """Ray Data's `iter_torch_batches` over the same files and column, in the driver (its read tasks on the
    local instance's CPUs): the path the workers do not take, measured beside the two that count."""
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    t, n = time.perf_counter(), 0
    for b in ray.data.read_parquet(files, columns=[column]).iter_torch_batches(batch_size=BATCH):
        n += len(b[column])
    return n / (time.perf_counter() - t)


def worker_loop(cfg: dict) -> None:
    """Inside a Ray Train worker: deliver one epoch in the platform's order, as the training loop does.
    The first epoch warms the process (imports, allocator, thread pools), like the anchor's warm-up scan;
    the second is timed, with a fresh reader, so no shard is still in memory."""
    import torch

    from openclaw.data.stream import ShardedData
    from openclaw.data.sampler import Sampler
    torch.set_num_threads(1)
    pa.set_cpu_count(ARROW_THREADS)
    for _ in range(2):
        data = ShardedData(cfg["spec"], cfg["shards"], cfg["features"], None, max_resident=2 * cfg["window"])
        sampler = Sampler(len(data), BATCH, BATCH, 0, 1, 0, data.shard_rows(), cfg["window"])
        t, n, epoch, offset = time.perf_counter(), 0, 0, 0
        for _ in range(len(data) // BATCH):
            ids, epoch, offset = sampler.global_batch_at(epoch, offset)
            n += len(data.batch(ids)["x"])
            now, ahead = sampler.windows_at(epoch, offset)
            data.prefetch(ahead, keep=now)  # after the batch: its shards come first
            offset += BATCH
        rate = n / (time.perf_counter() - t)
        data.close()
    Path(cfg["out"]).write_text(json.dumps({"rows_per_s": rate}))


def worker_rows_per_s(spec: str, features: str, window: int, out: Path) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    from openclaw.data.sources import resolve
    from openclaw.data.stream import shard_specs
    src = resolve(spec, "data.train")
    TorchTrainer(worker_loop, train_loop_config={"spec": spec, "shards": shard_specs(src.shards), "features": features,
                                                 "window": window, "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(storage_path=str(out.parent / "ray"), name=f"ingest-{time.time_ns()}",
                                                logging_config=ray.train.LoggingConfig(log_level="WARNING"))).fit()
    return json.loads(out.read_text())["rows_per_s"]


def prepared_scalar_columns(src: Path, work: Path) -> tuple[str, float]:
    """The 33-column shards after `to_tensor` (f0..f31 -> x), prepared once through the cache."""
    from openclaw.config import load_config
    from openclaw.data.sources import resolve
    from openclaw.data.prep import prepare
    cfg = load_config(base={"data": {"train": str(src), "label": None, "cache": {"dir": str(work / "cache")},
                                     "transforms": [{"op": "to_tensor", "prefix": "f", "out": "x"}]},
                            "task": "language_modeling", "train": {"global_batch_size": BATCH,
                                                                   "micro_batch_size": BATCH}})
    t0 = time.perf_counter()
    prepared, cache = prepare({"train": resolve(str(src), "data.train")}, cfg.data, str(work))
    p = prepared["train"]
    print(f"  prepared the scalar columns into one tensor column in {time.perf_counter() - t0:.1f} s "
          f"(cache {p.cache})", flush=True)
    cache.release(p.cache_key)
    return p.source.spec, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--token-rows", type=int, default=400_000)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of both sides, in ABBA order (default 5)")
    add_budget(ap)
    ap.add_argument("--window", type=int, default=4, help="data.shuffle_window_shards")
    ap.add_argument("--dir", default=None, help="where the datasets are made (default: a temporary folder)")
    args = ap.parse_args()
    import ray

    from ingest_raw_vs_raydata import make
    work = Path(args.dir or tempfile.mkdtemp(prefix="openclaw-ingest-"))
    scalar, tokens = work / "scalar", work / "tokens"
    if not scalar.exists():
        scalar.mkdir(parents=True)
        make(str(scalar), rows=args.rows)
    if not tokens.exists():
        make_tokens(tokens, args.token_rows)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    prepared, prepare_s = prepared_scalar_columns(scalar, work)
    cases = {"tokens, streaming from Parquet": (str(tokens), "x"),
             f"{args.rows:,} x 33 columns, prepared-cache hit": (prepared, "x")}
    results = {}
    for name, (spec, features) in cases.items():
        files = sorted(map(str, Path(spec).rglob("*.parquet")))  # the very files the worker reads
        raw_rows_per_s(files, features)  # warm the page cache
        got = alternate({"raw pyarrow scan": lambda: raw_rows_per_s(files, features),
                         "openclaw in a Ray Train worker": lambda: worker_rows_per_s(spec, features, args.window,
                                                                                     work / "out.json"),
                         "Ray Data iter_torch_batches": lambda: raydata_rows_per_s(files, features)},
                        args.repeats, args.budget_s)
        results[name] = summarize(f"{name}: rows/s delivered as torch batches", got, base="raw pyarrow scan",
                                  unit="rows/s", digits=0)
    results["prepare_s"] = round(prepare_s, 1)
    print(f"preparation of the scalar columns (to_tensor, once, through the cache): {prepare_s:.1f} s")
    ray.shutdown()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
