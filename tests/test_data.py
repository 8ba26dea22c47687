"""Data recipes write what the configs expect; bad sources fail early with the file and column named."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import prepare
from openclaw.data.sources import check_columns, column_to_numpy, resolve
from openclaw.errors import DataError


def test_digits_recipe(digits_dir):
    stats = json.loads((digits_dir / "stats.json").read_text())
    src = resolve(str(digits_dir / "train"), "data.train")
    assert src.num_rows == stats["train_rows"] == 1438 and len(src.files) == 4
    x = column_to_numpy(pq.read_table(src.files[0]).column("x"))
    assert x.shape[1] == 64 and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert resolve(str(digits_dir / "val"), "data.val").num_rows == 359


def test_text_recipe(text_dir):
    stats = json.loads((text_dir / "stats.json").read_text())
    src = resolve(str(text_dir / "train"), "data.train")
    x = column_to_numpy(pq.read_table(src.files[0]).column("x"))
    assert x.shape[1] == 65 and x.dtype == np.uint8 and src.num_rows == stats["train_rows"] > 1000
    assert 2.0 < stats["unigram_entropy_nats"] < 5.5  # bytes of Python source are far from uniform (5.55)


def test_synthetic_recipe_layouts(tmp_path):
    tensor = prepare("synthetic", tmp_path / "t", "--rows", "5000", "--features", "8", "--shards", "3")
    cols = prepare("synthetic", tmp_path / "c", "--rows", "5000", "--features", "8", "--layout", "columns")
    src = resolve(str(tensor / "train"), "data.train")
    assert src.num_rows == 5000 and len(src.files) == 3 and src.schema.names == ["x", "y"]
    assert resolve(str(cols / "train"), "data.train").schema.names[:2] == ["f0", "f1"]


def test_glob_and_single_file(digits_dir):
    assert len(resolve(str(digits_dir / "train" / "part-*.parquet"), "data.train").files) == 4
    assert resolve(str(digits_dir / "val" / "part-00000.parquet"), "data.val").num_rows == 359


def test_missing_path_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path below: not the checkout, where datasets/text may be prepared
    with pytest.raises(DataError, match=r"`data.train`: dataset path .*nope does not exist.*data/prepare.py"):
        resolve(str(tmp_path / "nope"), "data.train")
    # A missing `<folder>/train` or `<folder>/val` is what `prepare.py --out <folder>` writes.
    with pytest.raises(DataError) as e:
        resolve("datasets/text/val", "data.val")
    assert "`python data/prepare.py RECIPE --out datasets/text` writes datasets/text/train and datasets/text/val" \
        in str(e.value) and "digits" not in str(e.value)


def test_folder_without_parquet(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no .parquet files"):
        resolve(str(tmp_path), "data.train")


def test_corrupt_shard_is_named(tmp_path):
    pq.write_table(pa.table({"x": [1.0]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"shard .*b.parquet is not a readable Parquet file"):
        resolve(str(tmp_path), "data.train")


def test_schema_mismatch_between_shards(tmp_path):
    pq.write_table(pa.table({"x": [1.0], "y": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": [1.0], "label": [1]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"x": [1.0], "y": ["one"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"b.parquet: column 'y' is missing; column 'label' is extra.*on_bad_shard"):
        resolve(str(tmp_path), "data.train")
    src = resolve(str(tmp_path), "data.train", on_bad_shard="skip")
    assert src.files == (str(tmp_path / "a.parquet"),) and src.num_rows == 1
    assert [p.rsplit("/", 1)[1] for p, _ in src.skipped] == ["b.parquet", "c.parquet"]
    assert "column 'y' has type string, not int64" in src.skipped[1][1]


def test_corrupt_shard_skipped(tmp_path):
    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 garbage")
    src = resolve(str(tmp_path), "data.train", on_bad_shard="skip")
    assert src.num_rows == 2 and "not a readable Parquet file" in src.skipped[0][1]


def test_empty_dataset(tmp_path):
    pq.write_table(pa.table({"x": pa.array([], pa.float32())}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="no rows"):
        resolve(str(tmp_path), "data.train")


def test_missing_and_non_numeric_columns(tmp_path):
    pq.write_table(pa.table({"x": [1.0], "name": ["a"]}), tmp_path / "a.parquet")
    src = resolve(str(tmp_path), "data.train")
    with pytest.raises(DataError, match=r"`data.label`: column 'y' is not in .* \(columns: x, name\)"):
        check_columns(src, "x", "y")
    with pytest.raises(DataError, match=r"`data.label`: column 'name' .* has type string"):
        check_columns(src, "x", "name")
