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


def test_the_schema_most_shards_share_is_the_reference_not_the_first_shards(tmp_path):
    """One odd shard (an extra column) that sorted first made its schema the reference: the four good
    shards were named bad, and under `on_bad_shard: skip` the run trained on the odd one alone."""
    pq.write_table(pa.table({"x": [0.0], "y": [0], "debug": [0.0]}), tmp_path / "part-000.parquet")
    for i in range(1, 5):
        pq.write_table(pa.table({"x": [1.0], "y": [i]}), tmp_path / f"part-{i:03d}.parquet")
    with pytest.raises(DataError, match=r"part-000.parquet: column 'debug' is extra \(compared with .*part-001.parquet, "
                                        r"whose schema 4 of 5 readable shards share\)"):
        resolve(str(tmp_path), "data.train")
    src = resolve(str(tmp_path), "data.train", on_bad_shard="skip")
    assert [p.rsplit("/", 1)[1] for p in src.files] == [f"part-{i:03d}.parquet" for i in range(1, 5)]
    assert [p.rsplit("/", 1)[1] for p, _ in src.skipped] == ["part-000.parquet"] and src.schema.names == ["x", "y"]


def test_shards_that_differ_only_in_nullability_share_one_schema(tmp_path):
    """A column declared non-nullable in one shard (Spark writes them) refused the dataset, with a message
    that showed two identical schemas. Nulls themselves are refused by `check_columns` and at read time."""
    pq.write_table(pa.table({"x": pa.array([[0.5, 0.5]] * 2, pa.list_(pa.float32())), "y": [0, 1]}),
                   tmp_path / "a.parquet")
    strict = pa.schema([pa.field("x", pa.list_(pa.field("element", pa.float32(), nullable=False)), nullable=False),
                        pa.field("y", pa.int64(), nullable=False)])
    pq.write_table(pa.table({"x": [[1.0, 1.0]] * 2, "y": [2, 3]}, schema=strict), tmp_path / "b.parquet")
    src = resolve(str(tmp_path), "data.train")
    assert src.num_rows == 4 and len(src.files) == 2
    from openclaw.config import load_config
    from openclaw.exports.evaluate import val_batches
    config = load_config(None, {"data.val": str(tmp_path), "data.features": "x", "data.label": "y"},
                         base={"data": {"train": "x"}})
    assert val_batches(config)[0]["y"].tolist() == [0, 1, 2, 3]  # `export --eval` reads them as one table
    pq.write_table(pa.table({"x": pa.array([[1.0, 1.0]], pa.list_(pa.float32())), "y": [4.0]}),
                   tmp_path / "c.parquet")  # a type still counts
    with pytest.raises(DataError, match=r"c.parquet: column 'y' has type double, not int64 \(compared with "
                                        r".*a.parquet, whose schema 2 of 3 readable shards share\)"):
        resolve(str(tmp_path), "data.train")


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


def test_lists_of_different_lengths_are_refused_not_cut_into_other_rows(tmp_path):
    """Lengths 4, 3, 5, 4: 16 values, which a reshape to 4 rows of 4 cut across the rows' boundaries."""
    from openclaw.data.stream import ShardedData, shard_specs
    seqs = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16]]
    pq.write_table(pa.table({"x": pa.array(seqs, pa.list_(pa.int64())), "y": [0, 1, 2, 3]}), tmp_path / "p.parquet")
    src = resolve(str(tmp_path), "data.train")
    check_columns(src, "x", "y")  # a footer cannot tell: the read does
    with pytest.raises(DataError, match=r"p.parquet, column 'x': cannot be read as a tensor \(its rows hold lists "
                                        r"of 3 to 5 values, and every row must hold as many"):
        ShardedData(str(tmp_path), shard_specs(src.shards), "x", "y").batch(np.arange(4))
    even = pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.int64()))
    assert column_to_numpy(pa.chunked_array([even[:1], even[1:]])).tolist() == [[1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize("first", ["a", "b"])
def test_list_rows_of_another_width_in_another_shard_stop_the_read_naming_both(tmp_path, first):
    """Rows of 4 values in one shard and 3 in another: each shard alone was consistent, and a batch that
    mixed them took its shape from its first shard and padded the other's rows with uninitialised memory."""
    from openclaw.data.stream import ShardedData, shard_specs
    pq.write_table(pa.table({"x": pa.array([[1.0] * 4] * 5, pa.list_(pa.float32())), "y": range(5)}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([[2.0] * 3] * 5, pa.list_(pa.float32())), "y": range(5, 10)}),
                   tmp_path / "b.parquet")
    src = resolve(str(tmp_path), "data.train")
    check_columns(src, "x", "y")  # one schema: only the read can tell
    data = ShardedData(str(tmp_path), shard_specs(src.shards), "x", "y")
    ids, (this, this_shape), (other, other_shape) = (
        ([0, 5], ("b", 3), ("a", 4)) if first == "a" else ([5, 0], ("a", 4), ("b", 3)))
    data.batch(np.array(ids[:1]))  # the first shard read alone is fine
    with pytest.raises(DataError, match=rf"shard .*{this}.parquet, column 'x': its rows are float32 values of shape "
                                        rf"\({this_shape},\), but those of shard .*{other}.parquet are float32 values "
                                        rf"of shape \({other_shape},\)"):
        data.batch(np.array(ids))


LISTS = "a null or empty list, or a null element"


@pytest.mark.parametrize("column,what,read", [
    (pa.array([0, 1, None, 3]), "null values", "1 null row"),
    (pa.array([[1, 2], None, [3, 4], [5, 6]], pa.list_(pa.int64())), LISTS, "1 null row"),
    (pa.array([[1, 2], [], [3, 4], [5, 6]], pa.list_(pa.int64())), LISTS, "lists of 0 to 2 values"),
    (pa.array([[1, None], [2, 3], [3, 4], [5, 6]], pa.list_(pa.int64(), 2)), LISTS, "1 null value"),
])
def test_a_null_in_a_training_column_is_refused_from_the_footers_and_at_read_time(tmp_path, column, what, read):
    """A null label became NaN and then an IndexError deep in the loss; a null feature became NaN silently."""
    pq.write_table(pa.table({"x": [0.5] * 4, "y": column}), tmp_path / "p.parquet")
    src = resolve(str(tmp_path), "data.train")
    with pytest.raises(DataError, match=rf"`data.label`: column 'y' in shard .*p.parquet holds {what}; .*Fill or drop"):
        check_columns(src, "x", "y")
    check_columns(src, "x", "y", nulls=False)  # transformed data: the prepared shards are checked instead
    with pytest.raises(ValueError, match=read):  # a shard written without statistics
        column_to_numpy(column)


@pytest.mark.parametrize("dtype", [pa.uint16(), pa.uint32(), pa.uint64()])
def test_unsigned_labels_are_read_as_signed_integers_torch_can_index(tmp_path, dtype):
    """torch's index_select has no uint16-64 kernel: every worker's first batch failed."""
    from openclaw.data.stream import ShardedData, shard_specs
    pq.write_table(pa.table({"x": pa.array([[0.5, 0.5]] * 4, pa.list_(pa.float32(), 2)),
                             "y": pa.array([0, 1, 2, 65535], dtype)}), tmp_path / "p.parquet")
    src = resolve(str(tmp_path), "data.train")
    got = ShardedData(str(tmp_path), shard_specs(src.shards), "x", "y").batch(np.array([3, 0]))
    assert got["y"].tolist() == [65535, 0] and not got["y"].dtype.is_floating_point
    with pytest.raises(ValueError, match="past the int64 range"):
        column_to_numpy(pa.array([2 ** 63], pa.uint64()))


@pytest.mark.parametrize("args", [["--shards", "-1"], ["--shards", "0"], ["--rows", "0"], ["--seq-len", "x"]])
def test_prepare_refuses_counts_below_one_and_keeps_the_dataset_there(tmp_path, args):
    """`--shards -1` deleted the folder's shards, wrote none, and exited 0."""
    import subprocess
    import sys
    from conftest import REPO
    out = prepare("synthetic", tmp_path / "s", "--rows", "200", "--features", "4", "--shards", "2")
    before = sorted(p.name for p in (out / "train").iterdir())
    r = subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "synthetic", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"argument {args[0]}: " in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "train").iterdir()) == before == ["part-00000.parquet", "part-00001.parquet"]


def test_the_text_recipe_never_writes_an_empty_split(tmp_path):
    """A small `--source` (one file, or two the draw put both in train) wrote an empty `val/` and exited 0,
    as did a `--seq-len` longer than the text; the configs then refused the folder at the run's start.
    A `.py` file under a folder named site-packages inside the source was left out too."""
    import subprocess
    import sys

    from conftest import REPO
    src = tmp_path / "src" / "site-packages" / "pkg"  # the filter looks below --source only
    src.mkdir(parents=True)

    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "text", *args], capture_output=True,
                              text=True, timeout=120)
    (src / "a.py").write_text("x = 1\n" * 400)
    one = run("--source", str(src.parent), "--out", str(tmp_path / "one"))
    assert one.returncode != 0 and "1 .py file(s) under" in one.stderr and "at least 2" in one.stderr
    (src / "b.py").write_text("y = 2\n" * 400)
    two = run("--source", str(src.parent), "--out", str(tmp_path / "two"), "--seq-len", "16")
    stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert two.returncode == 0 and stats["train_rows"] > 0 and stats["val_rows"] > 0
    assert resolve(str(tmp_path / "two" / "val"), "data.val").num_rows == stats["val_rows"]
    long = run("--source", str(src.parent), "--out", str(tmp_path / "long"), "--seq-len", "100000")
    assert long.returncode != 0 and "less than one sequence of --seq-len 100000" in long.stderr
