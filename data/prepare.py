"""Dataset recipes: write sharded Parquet datasets that openclaw trains on.

    python data/prepare.py digits    --out datasets/digits
    python data/prepare.py text      --out datasets/text [--source DIR] [--seq-len 128]
    python data/prepare.py synthetic --out datasets/synth --rows 2000000 [--features 32] [--shards 8]

Every recipe writes `train/` and (except synthetic) `val/` folders of `part-NNNNN.parquet` shards, and a
`stats.json` with row counts. Features are one fixed-size list (tensor) column `x`; labels are `y`.
"""
from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def tensor_column(array: np.ndarray) -> pa.FixedSizeListArray:
    """`[N, D]` -> a fixed-size list column: one contiguous buffer, read back without a Python loop."""
    n, d = array.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(array).reshape(-1)), d)


def write_shards(table: pa.Table, out: Path, shards: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    per = -(-len(table) // shards)
    names = []
    for i in range(shards):
        part = table.slice(i * per, per)
        if len(part):
            name = out / f"part-{i:05d}.parquet"
            pq.write_table(part, name, row_group_size=min(len(part), 65_536))
            names.append(str(name))
    return names


def _write_stats(out: Path, stats: dict) -> None:
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))


# ---- recipes -------------------------------------------------------------------------------------

def digits(out: Path, val_fraction: float = 0.2, seed: int = 0, shards: int = 4) -> dict:
    """scikit-learn's bundled 8x8 digits (1,797 images), pixels scaled to [0, 1], as a train/val split."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)
    n_val = int(len(x) * val_fraction)
    for split, sl, n in (("train", slice(n_val, None), shards), ("val", slice(0, n_val), 1)):
        write_shards(pa.table({"x": tensor_column(x[sl]), "y": y[sl]}), out / split, n)
    stats = {"recipe": "digits", "train_rows": len(x) - n_val, "val_rows": n_val, "features": 64, "classes": 10}
    _write_stats(out, stats)
    return stats


def text(out: Path, source: str | None = None, seq_len: int = 128, val_fraction: float = 0.05,
         max_bytes: int | None = None, shards: int = 8) -> dict:
    """Byte-level token sequences of `seq_len + 1` bytes from every `.py` file under `source`
    (default: this Python's standard library). Files are split into train/val whole, so no val text
    was seen in training. Also records the unigram (byte frequency) entropy: the loss to beat."""
    root = Path(source or sysconfig.get_paths()["stdlib"])
    # (the standard library's own site-packages left out: installed packages, not the library)
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if len(files) < 2:
        raise SystemExit(f"{len(files)} .py file(s) under {root}: the recipe reads .py files, at least 2 (train "
                         f"and val are split by file); pass --source DIR with more")
    rng = np.random.default_rng(0)
    is_val = rng.random(len(files)) < val_fraction
    if not is_val.any():  # a small source: at least one file is val, so that val is never empty
        is_val[int(rng.integers(len(files)))] = True
    if is_val.all():
        is_val[int(rng.integers(len(files)))] = False
    streams = {"train": bytearray(), "val": bytearray()}
    for path, val in zip(files, is_val):
        buf = streams["val" if val else "train"]
        if max_bytes is None or len(buf) < max_bytes * (val_fraction if val else 1):
            buf += path.read_bytes()
    stats = {"recipe": "text", "source": str(root), "seq_len": seq_len, "vocab_size": 256}
    width = seq_len + 1
    for split, buf in streams.items():
        tokens = np.frombuffer(bytes(buf), dtype=np.uint8)
        rows = len(tokens) // width
        write_shards(pa.table({"x": tensor_column(tokens[:rows * width].reshape(rows, width))}), out / split,
                     shards if split == "train" else 1)
        stats[f"{split}_rows"] = rows
        stats[f"{split}_bytes"] = int(len(tokens))
        if rows == 0:  # nothing to train or evaluate on: the configs would refuse the folder later
            raise SystemExit(f"the {split} files hold {len(tokens)} bytes, less than one sequence of --seq-len "
                             f"{seq_len} + 1: lower --seq-len or pass a larger --source")
    counts = np.bincount(np.frombuffer(bytes(streams["train"]), dtype=np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    stats["unigram_entropy_nats"] = float(-(p * np.log(p)).sum())
    _write_stats(out, stats)
    return stats


def synthetic(out: Path, rows: int = 100_000, features: int = 32, classes: int = 10, shards: int = 8,
              layout: str = "tensor", seed: int = 0) -> dict:
    """`rows` random float32 feature vectors with a label from a fixed random linear rule (learnable).
    `layout`: `tensor` (one fixed-size list column `x`) or `columns` (f0..fN scalar columns plus `y`)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((features, classes)).astype(np.float32)
    xs, ys = [], []
    for start in range(0, rows, 1_000_000):
        x = rng.standard_normal((min(1_000_000, rows - start), features), dtype=np.float32)
        xs.append(x)
        ys.append((x @ w).argmax(1).astype(np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    cols = {"x": tensor_column(x)} if layout == "tensor" else {f"f{i}": x[:, i] for i in range(features)}
    write_shards(pa.table({**cols, "y": y}), out / "train", shards)
    stats = {"recipe": "synthetic", "train_rows": rows, "features": features, "classes": classes, "layout": layout}
    _write_stats(out, stats)
    return stats


RECIPES = {"digits": digits, "text": text, "synthetic": synthetic}


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (`--shards 0` or `-1` wrote no shard at all, after
    deleting the old ones, and reported success)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a sharded Parquet dataset for openclaw.")
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, type=Path, help="output folder (train/ and val/ go inside)")
    p.add_argument("--source", help="text: folder of .py files (default: the Python standard library)")
    p.add_argument("--seq-len", type=_positive, default=128, help="text: tokens per training sequence")
    p.add_argument("--max-bytes", type=_positive, help="text: cap on training bytes read")
    p.add_argument("--rows", type=_positive, default=100_000, help="synthetic: number of rows")
    p.add_argument("--features", type=_positive, default=32, help="synthetic: features per row")
    p.add_argument("--shards", type=_positive, default=None, help="number of training shards")
    p.add_argument("--layout", choices=["tensor", "columns"], default="tensor", help="synthetic: column layout")
    a = p.parse_args(argv)
    extra = {"shards": a.shards} if a.shards else {}
    if a.name == "digits":
        digits(a.out, **extra)
    elif a.name == "text":
        text(a.out, a.source, a.seq_len, max_bytes=a.max_bytes, **extra)
    else:
        synthetic(a.out, a.rows, a.features, layout=a.layout, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
