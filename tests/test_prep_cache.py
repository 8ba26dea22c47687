"""The transforms and the prepared-data cache, without Ray: keys, atomic publication, one preparer per
key across processes, and LRU eviction that never removes an entry in use."""
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import digits_config
from openclaw.config import load_config
from openclaw.data.sources import resolve
from openclaw.data.config import DataConfig
from openclaw.data.prep import fingerprint
from openclaw.errors import DataError
from openclaw.data.prep_cache import PrepCache
from openclaw.data.transforms import apply_to_table


def _transforms(*items):
    return DataConfig(train="x", transforms=list(items)).transforms


def test_builtin_transforms_make_one_tensor_column():
    table = pa.table({"f0": [1.0, 2.0], "f1": [3.0, 4.0], "label": [0, 1], "text": ["abcdefg", "hij"]})
    out = apply_to_table(table.drop(["text"]), _transforms(
        {"op": "to_tensor", "prefix": "f", "out": "x"}, {"op": "normalize", "column": "x", "mean": 1.0, "std": 2.0},
        {"op": "cast", "column": "label", "dtype": "int64"}))
    assert out.schema.field("x").type == pa.list_(pa.float32(), 2) and set(out.column_names) == {"x", "label"}
    assert out.column("x").to_pylist() == [[0.0, 1.0], [0.5, 1.5]]
    tokens = apply_to_table(table.select(["text"]), _transforms({"op": "tokenize_bytes", "column": "text",
                                                                 "seq_len": 4}))
    assert tokens.column("x").to_pylist() == [list(b"abcde"), list(b"fghij")]  # 10 bytes -> 2 windows of 5


def test_each_builtin_transform_does_exactly_what_it_says():
    """What a mutation of the transforms survived: the windows of a text whose length leaves a remainder,
    tokenizing replacing every column, a prefix matching only at the start, to_tensor's float32 default,
    and the refusals (a non-numeric column to normalize, an output column of more than 2 dimensions)."""
    text = pa.table({"text": ["abcdefghijklm"], "label": [1]})  # 13 bytes: two windows of 5, three left over
    tokens = apply_to_table(text, _transforms({"op": "tokenize_bytes", "column": "text", "seq_len": 4}))
    assert tokens.column_names == ["x"] and tokens.column("x").to_pylist() == [list(b"abcde"), list(b"fghij")]
    table = pa.table({"f0": [1, 2], "f1": [3, 4], "xf": [5, 6]})
    stacked = apply_to_table(table, _transforms({"op": "to_tensor", "prefix": "f"}))
    assert stacked.column_names == ["xf", "x"] and stacked.schema.field("x").type == pa.list_(pa.float32(), 2)
    assert stacked.column("x").to_pylist() == [[1.0, 3.0], [2.0, 4.0]]
    with pytest.raises(DataError, match=r"#0 \(normalize\): column 'text' has type .*; normalize needs numbers"):
        apply_to_table(text, _transforms({"op": "normalize", "column": "text"}))
    from openclaw.data.transforms import columns_to_table
    with pytest.raises(DataError, match=r"output column 'x' has shape \(2, 2, 2\); columns must be 1-D"):
        columns_to_table({"x": np.zeros((2, 2, 2))})


def test_a_user_transform_must_return_columns_and_its_whole_module_keys_the_cache(tmp_path, monkeypatch):
    """A user function returning something else than a dict of columns is named; the cache key follows the
    source of the function's whole module, so a change to a helper it calls prepares the data again."""
    import sys

    from openclaw.data.transforms import code_version
    (tmp_path / "prep_mod.py").write_text("def helper():\n    return 1\n\n\ndef f(batch):\n    return [helper()]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    transforms = _transforms({"op": "map_batches", "fn": "prep_mod:f"})
    with pytest.raises(DataError, match=r"#0 \(map_batches\): prep_mod:f returned list; it must return a dict"):
        apply_to_table(pa.table({"x": [1.0]}), transforms)
    before = code_version(transforms)
    (tmp_path / "prep_mod.py").write_text("def helper():\n    return 22\n\n\ndef f(batch):\n    return [helper()]\n")
    sys.modules.pop("prep_mod", None)
    assert code_version(transforms) != before


def test_user_transform_and_errors_name_the_transform_and_column(tmp_path, monkeypatch):
    (tmp_path / "my_prep.py").write_text("def double(batch, factor=2):\n"
                                         "    return {**batch, 'x': batch['x'] * factor}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = apply_to_table(pa.table({"x": [1.0, 2.0]}), _transforms({"op": "map_batches", "fn": "my_prep:double",
                                                                   "kwargs": {"factor": 3}}))
    assert out.column("x").to_pylist() == [3.0, 6.0]
    with pytest.raises(DataError, match=r"#1 \(normalize\): column 'z' is not in the data \(columns: x\)"):
        apply_to_table(pa.table({"x": [1.0]}), _transforms({"op": "cast", "column": "x", "dtype": "float32"},
                                                           {"op": "normalize", "column": "z"}))


def test_cache_key_changes_with_the_source_the_transforms_and_their_code(digits_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for p in (digits_dir / "train").glob("*.parquet"):
        (data / p.name).write_bytes(p.read_bytes())
    (tmp_path / "prep_fn.py").write_text("def f(batch):\n    return batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = digits_config(digits_dir, tmp_path, "sqlite:///x.db", **{"data.train": str(data), "data.transforms": [
        {"op": "map_batches", "fn": "prep_fn:f"}]})
    key = fingerprint(resolve(str(data), "data.train"), cfg.data)
    assert fingerprint(resolve(str(data), "data.train"), cfg.data) == key  # stable
    other = digits_config(digits_dir, tmp_path, "sqlite:///x.db", **{"data.train": str(data), "data.transforms": [
        {"op": "map_batches", "fn": "prep_fn:f", "kwargs": {"a": 1}}]})
    assert fingerprint(resolve(str(data), "data.train"), other.data) != key  # transform config
    os.utime(data / "part-00001.parquet", ns=(1, 1))
    assert fingerprint(resolve(str(data), "data.train"), cfg.data) != key  # a source file changed
    key = fingerprint(resolve(str(data), "data.train"), cfg.data)
    import sys
    (tmp_path / "prep_fn.py").write_text("def f(batch):\n    return dict(batch)\n")
    sys.modules.pop("prep_fn", None)
    assert fingerprint(resolve(str(data), "data.train"), cfg.data) != key  # the transform's code changed


def _prepare_slowly(root, key, log, start):
    cache = PrepCache(root, 10**9)
    start.wait(30)  # all three ask for the key at once: they overlap for sure

    def prepare(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        pq.write_table(pa.table({"x": [1, 2, 3]}), os.path.join(tmp, "part-00000.parquet"))
        time.sleep(0.5)  # a hold, with the others already asking: a reader of a half-written entry would see one
        return {"shards": [{"file": "part-00000.parquet", "rows": 3}]}

    entry = cache.acquire(key, prepare)
    assert pq.read_table(os.path.join(entry.path, "part-00000.parquet")).num_rows == 3
    cache.release(key)


def test_two_processes_preparing_one_key_make_one_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "prepared_by.txt"
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_prepare_slowly, args=(str(tmp_path / "c"), "k1", str(log), start)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1  # one preparer; the others waited and read its entry
    assert os.listdir(tmp_path / "c" / "entries") == ["k1"] and os.listdir(tmp_path / "c" / ".tmp") == []


def test_failed_preparation_leaves_no_entry(tmp_path):
    cache = PrepCache(str(tmp_path), 10**9)

    def boom(tmp):
        pq.write_table(pa.table({"x": [1]}), os.path.join(tmp, "part-00000.parquet"))
        raise RuntimeError("transform crashed")

    with pytest.raises(RuntimeError):
        cache.acquire("k", boom)
    assert cache.lookup("k") is None and os.listdir(tmp_path / ".tmp") == []
    assert cache.acquire("k", lambda tmp: {"shards": []}).hit is False


@pytest.mark.parametrize("damage", ["truncated", "no manifest"])
def test_an_entry_whose_manifest_cannot_be_read_is_prepared_again_in_its_place(tmp_path, damage):
    """A truncated manifest read as a miss, and the new entry's rename onto the old folder then failed with
    'Directory not empty', in every later run: the key was wedged for good."""
    cache = PrepCache(str(tmp_path), 10**9)

    def prepare(folder):
        (Path(folder) / "part-00000.parquet").write_bytes(b"x" * 10)
        return {"shards": [], "skipped": [], "prepare_s": 0.0}
    cache.acquire("k1", prepare)
    cache.release("k1")
    manifest = tmp_path / "entries" / "k1" / "manifest.json"
    manifest.write_text("") if damage == "truncated" else manifest.unlink()
    again = PrepCache(str(tmp_path), 10**9).acquire("k1", prepare)
    assert not again.hit and json.loads(manifest.read_text())["key"] == "k1"
    assert os.listdir(tmp_path / ".tmp") == []  # the old entry's remains are gone too


def test_lru_eviction_never_removes_an_entry_in_use(tmp_path):
    def entry(n):
        def prepare(tmp):
            pq.write_table(pa.table({"x": np.zeros(n)}), os.path.join(tmp, "part-00000.parquet"))
            return {}
        return prepare

    root = str(tmp_path / "c")
    other_run = PrepCache(root, 10**9)
    one_entry = other_run.acquire("in-use", entry(1000)).manifest["bytes"]  # another run trains on it (locked)
    ours = PrepCache(root, 10**9)
    for key in ("a", "b"):
        ours.acquire(key, entry(1000))
        ours.release(key)
    os.utime(os.path.join(root, "entries", "a", "manifest.json"), (1, 1))  # "a" is the least recently used
    os.utime(os.path.join(root, "entries", "in-use", "manifest.json"), (0, 0))  # older still, but in use
    ours.max_bytes = int(1.5 * one_entry)  # room for one entry of the four
    got = ours.acquire("c", entry(1000))
    assert got.evicted == ["a", "b"]  # least recently used first; the older "in-use" and our own "c" stay
    assert sorted(os.listdir(os.path.join(root, "entries"))) == ["c", "in-use"]
    other_run.release("in-use")
    assert "in-use" in ours.evict(keep="c")  # released: now it may go


def test_a_sweep_clears_what_died_runs_left_in_tmp_and_removes_no_lock_file(tmp_path):
    """Two runs starting at once (a sweep's trials share one cache) swept the lock files of keys with no
    entry, both: one's open or unlink met a file the other had just removed, and its start crashed with
    FileNotFoundError. A lock file removed while a run waited on it also split the lock, letting another
    run evict the entry it trained on. And a `<key>-unreadable-<id>` leftover was never swept."""
    root = tmp_path / "c"
    PrepCache(str(root), 10**9)
    for name in ("gone.lock", "gone.preparing.lock", "held.lock"):
        (root / ".locks" / name).touch()
    for name in ("dead-1a2b3c4d", "evict-old-1a2b3c4d", "bad-unreadable-1a2b3c4d", "held-1a2b3c4d"):
        (root / ".tmp" / name).mkdir()
        (root / ".tmp" / name / "part-00000.parquet").write_bytes(b"x")
    import fcntl
    fd = os.open(root / ".locks" / "held.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a run preparing `held`
    try:
        PrepCache(str(root), 10**9)
    finally:
        os.close(fd)
    assert os.listdir(root / ".tmp") == ["held-1a2b3c4d"]
    assert sorted(os.listdir(root / ".locks")) == ["bad.lock", "dead.lock", "gone.lock", "gone.preparing.lock",
                                                   "held.lock", "old.lock"]


def _evict_slowly(root, barrier, results):
    cache = PrepCache(root, 0)
    barrier.wait()
    try:
        results.put(cache.evict())
    except Exception as e:  # noqa: BLE001  (what the other process's eviction made of this one)
        results.put(f"{type(e).__name__}: {e}")


def test_two_runs_evicting_at_once_each_remove_some_entries_and_neither_fails(tmp_path):
    """Both listed an entry; the first removed it, and the second's rename of it raised FileNotFoundError
    out of its `acquire`: that run failed at its start."""
    root = str(tmp_path / "c")
    ctx, failures = multiprocessing.get_context("fork"), []
    for rounds in range(20):
        cache = PrepCache(root, 10**9)
        for key in [f"k{rounds}-{i}" for i in range(30)]:
            cache.acquire(key, lambda tmp: {})
            cache.release(key)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_evict_slowly, args=(root, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        failures += [g for g in got if isinstance(g, str)]
        assert sorted(k for g in got if isinstance(g, list) for k in g) == sorted(f"k{rounds}-{i}" for i in range(30))
        assert os.listdir(os.path.join(root, "entries")) == []
    assert failures == []


def test_an_entry_another_run_evicted_still_counts_toward_the_room_made(tmp_path, monkeypatch):
    """An entry gone between the listing and the lock was skipped without subtracting its size: the run
    then evicted more entries than the cache needed gone."""
    import openclaw.data.prep_cache as prep_cache
    root = str(tmp_path / "c")
    cache = PrepCache(root, 10**9)
    for i, key in enumerate(("old", "mid", "new")):
        cache.acquire(key, lambda tmp: (Path(tmp, "part-00000.parquet").write_bytes(b"x" * 1000), {})[1])
        cache.release(key)
        os.utime(os.path.join(root, "entries", key, "manifest.json"), (i, i))
    real = prep_cache._folder_bytes

    def evicted_meanwhile(path):  # another run evicts "old" while this one lists the entries
        size = real(path)
        if path.endswith(os.sep + "old"):
            os.rename(path, os.path.join(root, ".tmp", "evict-old-1a2b3c4d"))  # as its eviction does
        return size
    monkeypatch.setattr(prep_cache, "_folder_bytes", evicted_meanwhile)
    cache.max_bytes = 2500  # room for two of the three: once "old" is gone, nothing more goes
    assert cache.evict() == [] and sorted(os.listdir(os.path.join(root, "entries"))) == ["mid", "new"]


def test_transforms_are_validated_with_the_config(tmp_path):
    from openclaw.errors import ConfigError
    with pytest.raises(ConfigError, match="transforms"):
        load_config(base={"data": {"train": "x", "transforms": [{"op": "normalise", "column": "x"}]}})


def _shard_task_on(tmp_path, table: pa.Table, *transforms, row_group_size: int = 2) -> dict:
    """One shard through the preparation's per-shard task (as a Ray Data task runs it), written in
    row groups of `row_group_size`."""
    from openclaw.data.prep import _ShardTask
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=row_group_size)
    (tmp_path / "out").mkdir(exist_ok=True)
    task = _ShardTask(str(tmp_path), {}, _transforms(*transforms), str(tmp_path / "out"), None, 1, {})
    stat = (tmp_path / "part-0.parquet").stat()
    return task({"i": 0, "path": str(tmp_path / "part-0.parquet"), "size": stat.st_size,
                 "mtime_ns": stat.st_mtime_ns, "etag": ""})


def test_a_transform_that_fails_past_the_first_rows_stops_the_job_naming_it_not_as_a_bad_shard(tmp_path,
                                                                                               monkeypatch):
    """A transform's TypeError (a null text) escaped the task untyped, a schema that changed between row
    groups escaped as Arrow's ValueError, and so did a failed cast; an Arrow error in a transform counted as
    a bad shard, which `on_bad_shard: skip` then left out of training for good."""
    (tmp_path / "flaky.py").write_text(
        "import numpy as np\n\ndef second_group_fails(cols):\n"
        "    if cols['a'][0] >= 2:\n        raise TypeError('cannot convert NoneType to bytes')\n    return cols\n\n"
        "def type_drifts(cols):\n    return {'a': cols['a'].astype(np.float64 if cols['a'][0] >= 2 else np.int64)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = pa.table({"a": np.arange(4), "s": ["1", "2", "x", "4"]})
    for fn, said in (("flaky:second_group_fails", "TypeError: cannot convert NoneType to bytes"),
                     ("flaky:type_drifts", "Table schema does not match")):
        got = _shard_task_on(tmp_path, table, {"op": "map_batches", "fn": fn})
        assert got["error"] is None and got["fatal"].startswith("`data.transforms` failed on shard ")
        assert said in got["fatal"] and not list((tmp_path / "out").iterdir())  # its half-written part removed
    cast = _shard_task_on(tmp_path, table.drop(["a"]), {"op": "cast", "column": "s", "dtype": "int64"})
    assert cast["error"] is None and "ValueError: invalid literal" in cast["fatal"] and "part-0.parquet" in cast["fatal"]
    assert _shard_task_on(tmp_path, table, {"op": "cast", "column": "a", "dtype": "float32"})["rows"] == 4


def test_a_dataset_whose_every_shard_was_skipped_is_refused_on_both_paths(tmp_path):
    """With no transforms (verified only), every shard skipped gave a source of 0 rows: no error, and an
    evaluation then logged val/loss 0.0."""
    from openclaw.data.prep import _prepared_source
    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp_path / "part-0.parquet")
    raw = resolve(str(tmp_path), "data.val")
    manifest = {"shards": [], "skipped": [[str(tmp_path / "part-0.parquet"), "shard could not be read (x)"]]}
    for transformed in (False, True):
        with pytest.raises(DataError, match=r"`data.val`: no rows left after .* \(1 bad shard\(s\) skipped; the "
                                            r"first: shard could not be read \(x\)\)"):
            _prepared_source(raw, str(tmp_path / "entry"), manifest, transformed=transformed)


@pytest.mark.parametrize("first", ["no row groups", "pages damaged"])
def test_the_transforms_are_tried_on_the_first_shard_with_rows_and_a_bad_one_is_named(tmp_path, first):
    """The preflight tried them on the first shard's first row group: one written with no row group raised
    ArrowInvalid, and one with damaged pages an OSError, both raw, even under `on_bad_shard: skip`."""
    from openclaw.data.prep import check_transforms
    table = pa.table({"f0": np.arange(100, dtype=np.float32), "f1": np.arange(100, dtype=np.float32), "y": np.arange(100)})
    bad = tmp_path / "p0.parquet"
    if first == "no row groups":
        pq.ParquetWriter(bad, table.schema).close()
    else:
        pq.write_table(table, bad)
        body = bytearray(bad.read_bytes())
        body[4:60] = b"\xff" * 56  # page headers destroyed; the footer still reads
        bad.write_bytes(bytes(body))
    pq.write_table(table, tmp_path / "p1.parquet")
    transforms = [{"op": "to_tensor", "prefix": "f", "out": "x"}]
    skip = DataConfig(train="x", transforms=transforms, on_bad_shard="skip")
    assert check_transforms(resolve(str(tmp_path), "data.train", on_bad_shard="skip"), skip).names == ["y", "x"]
    if first == "pages damaged":
        with pytest.raises(DataError, match=r"`data.train`: shard .*p0.parquet could not be read .*on_bad_shard: skip"):
            check_transforms(resolve(str(tmp_path), "data.train"), DataConfig(train="x", transforms=transforms))


def _acquire_and_say(root, key, done):
    cache = PrepCache(root, 10**9)
    cache.acquire(key, lambda tmp: {"shards": [], "skipped": [], "prepare_s": 0.0})
    done.set()


def test_a_run_holding_a_key_shared_does_not_stop_another_from_preparing_it(tmp_path):
    """Two runs that both missed held the key's lock shared; the first then asked for it exclusively to
    prepare and waited for the second, whose own request waited for the first: in the other order, the
    second waited for the first's whole run. Here another run holds the key shared (it missed, and waits
    to prepare): this one must still prepare, publish and return."""
    import fcntl
    root = str(tmp_path / "c")
    PrepCache(root, 10**9)  # the folders
    fd = os.open(os.path.join(root, ".locks", "k1.lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        ctx = multiprocessing.get_context("fork")
        done = ctx.Event()
        proc = ctx.Process(target=_acquire_and_say, args=(root, "k1", done))
        proc.start()
        published = done.wait(60)
        proc.kill()
        proc.join()
    finally:
        os.close(fd)
    assert published and json.loads((tmp_path / "c" / "entries" / "k1" / "manifest.json").read_text())["key"] == "k1"


def _prepare_in_process(src, d, tmp):
    """What `prep._prepare_source` does, with its per-shard task run here instead of in Ray Data."""
    from openclaw.data.prep import _ShardTask
    task = _ShardTask(src.spec, d.s3.model_dump(), d.transforms, tmp, None, 1, {})
    done = [task({"i": i, "path": s.path, "size": s.size, "mtime_ns": s.mtime_ns, "etag": s.etag})
            for i, s in enumerate(src.shards)]
    return {"source": src.uri, "shards": [{"source": r["path"], "file": r["file"], "rows": r["rows"],
                                           "bytes": r["bytes"]} for r in done],
            "skipped": [], "rows": sum(r["rows"] for r in done), "transforms": [], "prepare_s": 0.0}


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_published_entry_whose_part_cannot_be_read_is_prepared_again_in_its_place(tmp_path, monkeypatch, damage):
    """A part file cut short or deleted under a published entry: every later run hit the entry and failed
    with Arrow's bare ArrowInvalid or FileNotFoundError (CLI exit 1), and nothing ever prepared it again."""
    import openclaw.data.prep as prep
    (tmp_path / "raw").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"x": np.arange(10, dtype=np.float32), "y": np.arange(10) + 10 * i}),
                       tmp_path / "raw" / f"s{i}.parquet")
    d = DataConfig(train=str(tmp_path / "raw"), transforms=[{"op": "cast", "column": "y", "dtype": "int32"}],
                   cache={"dir": str(tmp_path / "cache")})
    src = resolve(d.train, "data.train")
    monkeypatch.setattr(prep, "_prepare_source", _prepare_in_process)
    first, cache = prep.prepare({"train": src}, d, str(tmp_path))
    cache.release(first["train"].cache_key)
    part = Path(first["train"].source.shards[1].path)
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[:100])
    else:
        part.unlink()
    again, cache = prep.prepare({"train": src}, d, str(tmp_path))
    assert again["train"].cache == "miss" and again["train"].source.num_rows == 30
    assert pq.read_table(part).column("y").to_pylist() == list(range(10, 20))
    cache.release(again["train"].cache_key)
    assert prep.prepare({"train": src}, d, str(tmp_path))[0]["train"].cache == "hit"
    assert os.listdir(tmp_path / "cache" / ".tmp") == []  # the damaged entry's remains are gone

    def loses_a_part(src, d, tmp):  # damaged on every preparation: named, not prepared for ever
        manifest = _prepare_in_process(src, d, tmp)
        os.unlink(os.path.join(tmp, "part-00002.parquet"))
        return manifest
    monkeypatch.setattr(prep, "_prepare_source", loses_a_part)
    d2 = d.model_copy(update={"transforms": _transforms({"op": "cast", "column": "y", "dtype": "int64"})})
    with pytest.raises(DataError, match=r"the prepared-data cache entry .*cache/entries/\w+ cannot be read even "
                                        r"prepared again \(.*part-00002.parquet.*\); delete it"):
        prep.prepare({"train": src}, d2, str(tmp_path))

    def too_many_files(*args, **kwargs):  # not damage: named, and the entry (another run may read it) kept
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(prep, "_prepared_source", too_many_files)
    with pytest.raises(DataError, match=r"cache/entries/\w+ could not be read \(OSError: \[Errno 24\] Too many "
                                        r"open files\); run again"):
        prep.prepare({"train": src}, d, str(tmp_path))
    assert pq.read_table(part).column("y").to_pylist() == list(range(10, 20))  # still there, as prepared
