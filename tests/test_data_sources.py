"""Object-store sources (a real S3-compatible server on loopback) and each node's shard cache; the
worker's shard stream. No Ray: these are the pieces the workers and the preparation tasks use."""
import resource
import signal
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from openclaw.data.sources import resolve
from openclaw.data.stream import ShardedData, shard_specs
from openclaw.errors import DataError
from openclaw.data.shard_cache import ShardCache


def _stream(src, cache=None, resident=0):
    return ShardedData(src.spec, shard_specs(src.shards), "x", "y", s3=None, shard_cache=cache, max_resident=resident)


def test_stream_ids_follow_file_order_with_bounded_residency(tmp_path):
    for i in range(12):  # shards of very different sizes
        rows = 2_000 if i % 3 == 0 else 50
        pq.write_table(pa.table({"x": np.arange(rows, dtype=np.int64) + i * 1_000_000, "y": np.full(rows, i)}),
                       tmp_path / f"part-{i:03d}.parquet")
    src = resolve(str(tmp_path), "data.train")
    data = _stream(src, resident=3)
    want = pq.read_table(sorted(tmp_path.glob("*.parquet"))).column("x").to_numpy()
    ids = np.random.default_rng(0).permutation(len(data))
    for chunk in np.array_split(ids[:3000], 30):  # random ids: every batch touches several shards
        assert np.array_equal(data.batch(np.sort(chunk[:2]))["x"].numpy(), want[np.sort(chunk[:2])])
        assert len(data._resident) <= 3
    # A batch wider than the residency bound: it reads the shards it needs, gathers from each, and
    # afterwards keeps no more than the bound resident.
    batch = data.batch(ids[:500])
    assert np.array_equal(batch["x"].numpy(), want[ids[:500]])
    assert len(data._resident) <= 3
    seq = np.concatenate([b["x"].numpy() for b in data.sequential(np.arange(len(data)), 256)])
    assert np.array_equal(seq, want)


def test_every_window_after_the_first_is_read_ahead_within_the_bound(tmp_path):
    """The attempt's order: a step's batch, then the read-ahead of the next window (its reads finish
    while the step computes). Every shard a step needs is already held, but those of the run's first
    window, and never more than two windows' shards are (`max_resident`). Before, a full stream let
    nothing go to make room: only the second window was read ahead, and every later one was read while
    its first step waited (10 of 12 shards here)."""
    from openclaw.data.sampler import Sampler, shard_windows
    for i in range(12):
        pq.write_table(pa.table({"x": np.arange(1000, dtype=np.int64) + i * 1000, "y": np.full(1000, i)}),
                       tmp_path / f"part-{i:03d}.parquet")
    src = resolve(str(tmp_path), "data.train")
    data = _stream(src, resident=4)  # two windows of two shards, as the attempt sets it
    sampler = Sampler(len(data), 100, 100, 0, 1, 0, data.shard_rows(), 2)
    epoch, offset, missed, reads = 0, 0, [], []
    read = data._read
    data._read = lambda i: (reads.append(i), read(i))[1]  # which shards the reader thread reads, in order
    for step in range(120):  # one epoch
        ids, epoch, offset = sampler.global_batch_at(epoch, offset)
        needed = set(np.searchsorted(data.starts, ids, side="right") - 1)
        missed += [(epoch, int(i)) for i in needed if int(i) not in data._resident]
        assert np.array_equal(data.batch(ids)["x"].numpy(), ids)  # row id i holds value i here
        now, ahead = sampler.windows_at(epoch, offset)
        data.prefetch(ahead, keep=now)
        for f in list(data._resident.values()):  # the step computes while the reads finish
            f.result()
        assert len(data._resident) <= 4
        offset += 100
    first = set(sampler.windows_at(0, 0)[0].tolist())
    assert sorted(i for _, i in missed) == sorted(first) and all(e == 0 for e, _ in missed), missed
    # each shard read once in the epoch, in window order; then the next epoch's first window, ahead
    assert [set(reads[k:k + 2]) for k in range(0, 12, 2)] == [set(w.tolist()) for w in shard_windows(0, 0, 12, 2)]
    assert len(reads) <= 14


def test_s3_source_streams_through_the_node_cache_and_rereads_without_the_network(s3_server, digits_dir, tmp_path):
    uri = s3_server.upload(digits_dir / "train", "bkt/digits/train")
    s3 = {"endpoint_url": s3_server.endpoint}
    src = resolve(uri, "data.train", s3)
    local = resolve(str(digits_dir / "train"), "data.train")
    assert len(src.shards) == 4 and src.num_rows == local.num_rows == 1438
    ids = np.random.default_rng(1).permutation(src.num_rows)[:300]
    want = _stream(local).batch(ids)

    cache = ShardCache(str(tmp_path / "shards"), max_bytes=10**9)
    remote = ShardedData(uri, shard_specs(src.shards), "x", "y", s3=s3, shard_cache=cache)
    got = remote.batch(ids)
    assert all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in ("x", "y"))
    assert (cache.stats.misses, cache.stats.hits, cache.stats.bytes_fetched) == (4, 0, src.num_bytes)

    # a damaged local copy fails its CRC and is fetched again, not trained on
    copy = next(p for p in (tmp_path / "shards").glob("*.parquet"))
    body = bytearray(copy.read_bytes())
    body[len(body) // 2] ^= 0xFF
    copy.write_bytes(bytes(body))
    again = ShardCache(str(tmp_path / "shards"), max_bytes=10**9)
    ShardedData(uri, shard_specs(src.shards), "x", "y", s3=s3, shard_cache=again).batch(ids)
    assert (again.stats.misses, again.stats.hits) == (1, 3)

    s3_server.stop()  # no network from here on
    offline = ShardCache(str(tmp_path / "shards"), max_bytes=10**9)
    got = ShardedData(uri, shard_specs(src.shards), "x", "y", s3=s3, shard_cache=offline).batch(ids)
    assert np.array_equal(got["x"].numpy(), want["x"].numpy()) and offline.stats.hits == 4


def test_shard_cache_evicts_least_recently_used_to_its_limit(s3_server, digits_dir, tmp_path):
    uri = s3_server.upload(digits_dir / "train", "bkt/d")
    src = resolve(uri, "data.train", {"endpoint_url": s3_server.endpoint})
    limit = src.shards[0].size * 2 + 10  # room for two shards
    cache = ShardCache(str(tmp_path / "shards"), max_bytes=limit)
    data = ShardedData(uri, shard_specs(src.shards), "x", "y", s3={"endpoint_url": s3_server.endpoint},
                       shard_cache=cache, max_resident=1)
    for i, s in enumerate(src.shards):  # read shards 0, 1, 2, 3 in turn
        data.batch(np.array([sum(x.rows for x in src.shards[:i])]))
    cached = sorted((tmp_path / "shards").glob("*.parquet"))
    assert len(cached) == 2 and sum(p.stat().st_size for p in cached) <= limit
    assert len(cache.stats.evicted) == 2
    # the two newest (2 and 3) stay: shard 2 comes from disk, shard 0 from the network again
    data.batch(np.array([sum(x.rows for x in src.shards[:2])]))
    assert (cache.stats.hits, cache.stats.misses) == (1, 4)
    data.batch(np.array([0]))
    assert (cache.stats.hits, cache.stats.misses) == (1, 5)


def test_unreachable_endpoint_says_what_to_check(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(DataError, match=r"`data.train`: cannot reach s3://bkt/x .*data.s3.endpoint_url"):
        resolve("s3://bkt/x", "data.train", {"endpoint_url": "http://127.0.0.1:9"})


def test_a_shard_that_breaks_at_read_time_is_named(tmp_path):
    pq.write_table(pa.table({"x": np.arange(100, dtype=np.float32), "y": np.arange(100)}), tmp_path / "part-0.parquet")
    body = bytearray((tmp_path / "part-0.parquet").read_bytes())
    body[8:60] = b"\xab" * 52  # page headers destroyed; the footer still reads
    (tmp_path / "part-0.parquet").write_bytes(bytes(body))
    src = resolve(str(tmp_path), "data.train")  # footers pass
    with pytest.raises(DataError, match=r"shard .*part-0.parquet could not be read \(.*page header.*on_bad_shard: skip"):
        _stream(src).batch(np.arange(4))


def test_number_columns_value_ranges_come_from_the_footers(tmp_path):
    """Each shard's integer and float columns' least and greatest values, a fixed-size list's over its
    elements, from the footers' statistics across row groups; a shard written without statistics gives
    none (nothing is known, so nothing is checked)."""
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(40, dtype=np.uint8) + 3), 4)
    pq.write_table(pa.table({"x": tokens, "y": np.arange(10) - 2, "f": np.linspace(0, 1, 10)}),
                   tmp_path / "part-0.parquet", row_group_size=3)
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(np.full(8, 200, dtype=np.uint8)), 4),
                             "y": np.array([7, 50]), "f": np.zeros(2)}), tmp_path / "part-1.parquet")
    src = resolve(str(tmp_path), "data.train")
    assert src.value_range("x") == (3, 200) and src.value_range("y") == (-2, 50)
    assert src.value_range("f") == (0.0, 1.0) and src.value_range("missing") is None
    from openclaw.config import load_config
    from openclaw.launch.preflight import check_value_ranges
    classes = load_config(None, {"data": {"train": str(tmp_path), "features": "x", "label": "y"},
                                 "model": {"name": "mlp", "kwargs": {"in_features": 4, "num_classes": 100}}})
    with pytest.raises(DataError, match=r"holds labels from -2 to 50, but the model's output width is 100: labels "
                                        r"must lie in 0..99. A negative label scores nothing \(but -100"):
        check_value_ranges(classes, {"train": src})
    pq.write_table(pa.table({"x": tokens, "y": np.arange(10), "f": np.zeros(10)}), tmp_path / "part-2.parquet",
                   write_statistics=False)
    assert resolve(str(tmp_path), "data.train").value_range("y") is None


@pytest.mark.parametrize("labels,error", [
    ([0.0, 3.0, 9.0, np.nan], None),
    ([0.0, 3.0, 12.0], r"holds labels from 0 to 12, but the model's output width is 10: labels must lie in 0..9"),
    ([0.25, 3.0, 9.5], r"column 'y' \(`data.label`\) holds labels from 0.25 to 9.5: labels must be whole numbers, "
                       r"and a fraction would be cut off without a word"),
    ([0.0, 3.0, 9.5], r"holds labels from 0 to 9.5: labels must be whole numbers"),  # one end whole is not enough
    ([0.0, 10.0], r"holds labels from 0 to 10, but the model's output width is 10: .* at least 11"),  # at the width
    ([-100.0, 3.0, 9.0], None)])  # -100: the label the loss ignores
def test_a_float_label_column_is_checked_as_class_ids(tmp_path, labels, error):
    """A float label column (pandas writes one where an integer column has a missing value) holds class ids
    only if they are whole: the loss casts each to an integer. Its footers' range says whether both ends
    are whole, and in range (NaNs are in no footer's range: the workers' loss refuses them)."""
    from openclaw.config import load_config
    from openclaw.launch.preflight import check_value_ranges
    rows = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4 * len(labels), dtype=np.float32)), 4)
    pq.write_table(pa.table({"x": rows, "y": np.array(labels)}), tmp_path / "part-0.parquet")
    config = load_config(None, {"data": {"train": str(tmp_path), "features": "x", "label": "y"},
                                "model": {"name": "mlp", "kwargs": {"in_features": 4, "num_classes": 10}}})
    source = resolve(str(tmp_path), "data.train")
    if error is None:
        check_value_ranges(config, {"train": source})
        return
    with pytest.raises(DataError, match=error):
        check_value_ranges(config, {"train": source})


def test_the_models_output_width_is_found_on_the_meta_device(digits_dir, text_dir):
    """The width a label or token id must stay under: a forward of the built-in models on two meta rows
    shaped as the data's (no weights, whatever the size); a user's model's embedding narrower than its
    head bounds the ids too. The check passes data that fits and names the key for data that does not."""
    from conftest import digits_config
    from openclaw.config import load_config
    from openclaw.launch.preflight import check_value_ranges, output_width
    digits = digits_config(digits_dir, digits_dir, "sqlite:///unused.db", **{"model.kwargs.num_classes": 7})
    train = {"train": resolve(str(digits_dir / "train"), "data.train")}
    assert output_width(digits, train["train"]) == (7, "output width", "`model.kwargs.num_classes`")
    with pytest.raises(DataError, match=r"holds labels from 0 to 9, but the model's output width is 7: labels must "
                                        r"lie in 0..6. Set `model.kwargs.num_classes` to at least 10"):
        check_value_ranges(digits, train)
    check_value_ranges(digits.model_copy(update={"model": digits.model.model_copy(
        update={"kwargs": {**digits.model.kwargs, "num_classes": 10}})}), train)
    text = load_config(None, {"data": {"train": str(text_dir / "train"), "features": "x", "label": None},
                              "task": "language_modeling",
                              "model": {"name": "gpt", "kwargs": {"vocab_size": 300, "block_size": 64, "dim": 32,
                                                                  "depth": 1, "heads": 2}}})
    source = resolve(str(text_dir / "train"), "data.train")
    assert output_width(text, source) == (300, "output width", "`model.kwargs.vocab_size`")
    lo, hi = source.value_range("x")
    assert 0 <= lo <= hi < 256
    check_value_ranges(text, {"train": source})
    narrow = text.model_copy(update={"model": text.model.model_copy(update={"name": "user_models:narrow_embedding",
                                                                          "kwargs": {"rows": 50}})})
    assert output_width(narrow, source) == (50, "first embedding's row count", "user_models:narrow_embedding's vocabulary")
    with pytest.raises(DataError, match=r"but the model's first embedding's row count is 50"):
        check_value_ranges(narrow, {"train": source})


def test_the_preflight_builds_the_model_once(text_dir, tmp_path):
    """The layout check and the value check share one build of the model on the meta device: a user's
    constructor runs once in the preflight, not once per check."""
    from openclaw.config import load_config
    from openclaw.launch.preflight import preflight
    from user_models import NarrowEmbedding
    config = load_config(None, {"data": {"train": str(text_dir / "train"), "features": "x", "label": None},
                                "task": "language_modeling", "checkpoint": {"storage": str(tmp_path / "runs")},
                                "model": {"name": "user_models:narrow_embedding", "kwargs": {"rows": 300}}})
    before = NarrowEmbedding.BUILDS
    assert set(preflight(config)) == {"train"}
    assert NarrowEmbedding.BUILDS - before == 1


def _meta_error(run) -> BaseException:
    """The error torch raises for `run(x)` on two meta rows of 64 floats."""
    try:
        run(torch.empty(2, 64, device="meta"))
    except BaseException as e:  # noqa: BLE001 - the error itself is what the test reads
        return e
    raise AssertionError("no error")


MISFITS = {  # a model that does not fit rows of 64 floats: real rows of that shape fail alike
    "linear": lambda x: nn.Linear(32, 10, device="meta")(x),
    "layer norm": lambda x: nn.LayerNorm(32, device="meta")(x),
    "conv rank": lambda x: nn.Conv2d(3, 8, 3, device="meta")(x),
    "conv channels": lambda x: nn.Conv2d(3, 8, 3, device="meta")(x.view(2, 1, 8, 8)),
    "view": lambda x: x.view(2, 3, 7),
    "broadcast": lambda x: x + torch.empty(2, 32, device="meta"),
    "dim": lambda x: x.sum(dim=3),
    "embedding of floats": lambda x: nn.Embedding(10, 4, device="meta")(x),
    "cat": lambda x: torch.cat([x, torch.empty(3, 32, device="meta")], dim=1),
}
META_ONLY = {  # what only the meta device (or a driver without a GPU or a group) cannot do: the workers can
    "item": lambda x: x.max().item(),
    "branch on a value": lambda x: bool(x.sum() > 0),
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "boolean mask": lambda x: x[x > 0],
    "no meta kernel": lambda x: torch.unique(x),
    "process group": lambda x: torch.distributed.get_rank(),
    "repeats read from values": lambda x: torch.repeat_interleave(x[0].long()),  # says "size" and "meta"
    "bare assert": lambda x: (_ for _ in ()).throw(AssertionError()),
}


@pytest.mark.parametrize("case", [*MISFITS, *META_ONLY])
def test_a_meta_forward_error_is_judged_a_misfit_only_where_real_rows_would_fail_alike(case):
    from openclaw.launch.preflight import misfits_the_rows
    assert misfits_the_rows(_meta_error({**MISFITS, **META_ONLY}[case])) == (case in MISFITS)


def test_a_users_model_that_reads_a_value_passes_the_preflight(digits_dir, tmp_path):
    """Its meta forward fails (no values there), which says nothing of real rows: the workers run it."""
    from openclaw.config import load_config
    from openclaw.launch.preflight import output_width, preflight
    config = load_config(None, {"data": {"train": str(digits_dir / "train"), "features": "x", "label": "y"},
                                "checkpoint": {"storage": str(tmp_path / "runs")},
                                "model": {"name": "user_models:reads_a_value", "kwargs": {}}})
    assert set(preflight(config)) == {"train"}
    assert output_width(config, resolve(str(digits_dir / "train"), "data.train")) is None


def test_a_language_model_with_a_label_column_the_data_lacks_is_told_to_set_none(text_dir, tmp_path):
    """The text data has no `y`: the error said to set `data.label` to one of the columns, and a label equal
    to the features then failed every worker with Arrow's 'Field "x" exists 2 times'."""
    from conftest import REPO
    from openclaw.config import load_config
    from openclaw.errors import ConfigError
    from openclaw.launch.preflight import preflight
    base = {"data.train": str(text_dir / "train"), "data.val": None, "checkpoint.storage": str(tmp_path / "runs"),
            "tracking.enabled": False}
    config = load_config(REPO / "jobs" / "configs" / "text-lm.yaml", {**base, "data.label": "y"})
    with pytest.raises(DataError, match=r"`data.label`: column 'y' is not in .* language modeling needs none: .* "
                                        r"Set `data.label: null`\."):
        preflight(config)
    with pytest.raises(ConfigError, match=r"Language modeling takes its targets from the features .* set "
                                          r"`data.label: null`"):
        load_config(REPO / "jobs" / "configs" / "text-lm.yaml", {**base, "data.label": "x"})


class _OnceUnreachable:
    """An object store (a local folder underneath) whose first request for each path in `flaky` fails as
    a reset connection does."""
    type_name = "s3"

    def __init__(self, root, flaky: set[str]):
        import pyarrow.fs as pafs
        self.local, self.flaky = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()), set(flaky)

    def _fail_once(self, path):
        if path in self.flaky:
            self.flaky.discard(path)
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Failure when "
                          "receiving data from the peer")

    def open_input_stream(self, path):
        self._fail_once(path)
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        self._fail_once(path)
        return self.local.open_input_file(path)


def test_a_reset_connection_is_read_again_not_taken_for_a_bad_shard(tmp_path, monkeypatch):
    """Under `on_bad_shard: skip`, one failed GetObject made a good shard 'bad' while preparing, and the
    cached preparation (whose key does not depend on it) left it out of every later run."""
    import openclaw.data.prep as prep
    from openclaw.data.sources import _footer
    (tmp_path / "bkt").mkdir()
    pq.write_table(pa.table({"x": np.arange(10, dtype=np.float32), "y": np.arange(10)}), tmp_path / "bkt" / "p1.parquet")
    size = (tmp_path / "bkt" / "p1.parquet").stat().st_size
    fs = _OnceUnreachable(tmp_path, {"bkt/p1.parquet"})
    meta, _ = _footer(fs, "bkt/p1.parquet")
    assert meta.num_rows == 10 and not fs.flaky  # failed once, read on the second try

    monkeypatch.setattr(prep, "filesystem_for", lambda spec, s3=None: (fs, "bkt"))
    monkeypatch.setattr(prep, "RETRY_PAUSE_S", 0.0)
    task = prep._ShardTask("s3://bkt", {}, [], str(tmp_path / "out"), str(tmp_path / "shards"), 1 << 20, {})
    fs.flaky = {"bkt/p1.parquet"}
    got = task({"i": 0, "path": "bkt/p1.parquet", "size": size, "mtime_ns": 1, "etag": ""})
    assert got["error"] is None and got["rows"] == 10 and not fs.flaky
    always = _OnceUnreachable(tmp_path, set())
    always._fail_once = lambda path: (_ for _ in ()).throw(OSError("still down"))
    monkeypatch.setattr(prep, "filesystem_for", lambda spec, s3=None: (always, "bkt"))
    assert "still down" in task({"i": 0, "path": "bkt/p1.parquet", "size": size, "mtime_ns": 2, "etag": ""})["error"]


@contextmanager
def _writes_past(nbytes: int):
    """Writes past `nbytes` fail (EFBIG: RLIMIT_FSIZE, with SIGXFSZ ignored), as writes to a full disk fail
    (ENOSPC). The moto server is another process: not limited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_shard_cache_that_cannot_write_serves_the_fetched_shard_not_a_bad_shard(s3_server, tmp_path, caplog):
    """A full disk under the shard cache left a `.part` file, stopped the worker blaming the shard ("could
    not be read ... set on_bad_shard: skip"), and under `skip` the preparation took the good shard for a
    bad one: retried, skipped, and recorded in the cached preparation, so later runs trained without it."""
    from openclaw.data.prep import _ShardTask
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"x": np.arange(20_000, dtype=np.float32), "y": np.arange(20_000)}),
                   tmp_path / "src" / "p0.parquet")
    uri = s3_server.upload(tmp_path / "src", "bkt/d")
    s3 = {"endpoint_url": s3_server.endpoint}
    src = resolve(uri, "data.train", s3)
    assert src.shards[0].size > 64 * 1024
    folder = tmp_path / "shards"
    cache = ShardCache(str(folder), max_bytes=10**9)
    task = _ShardTask(uri, s3, [], str(tmp_path / "out"), str(folder), 10**9, {})
    shard = src.shards[0]
    with _writes_past(64 * 1024), caplog.at_level("WARNING", logger="openclaw"):
        got = ShardedData(uri, shard_specs(src.shards), "x", "y", s3=s3, shard_cache=cache).batch(np.array([7, 19_999]))
        prepared = task({"i": 0, "path": shard.path, "size": shard.size, "mtime_ns": shard.mtime_ns, "etag": shard.etag})
    assert got["x"].tolist() == [7.0, 19_999.0] and got["y"].tolist() == [7, 19_999]
    assert prepared["error"] is None and prepared["rows"] == 20_000
    assert f"could not keep shard {shard.path} in the shard cache {folder}" in caplog.text and "Errno 27" in caplog.text
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []  # no `.part`, no half entry
    ShardCache(str(folder), max_bytes=10**9).read(s3_server.filesystem(), shard.path, shard.size, shard.mtime_ns,
                                                  shard.etag)
    again = ShardCache(str(folder), max_bytes=10**9)  # with room again, the shard is cached as before
    again.read(s3_server.filesystem(), shard.path, shard.size, shard.mtime_ns, shard.etag)
    assert (again.stats.hits, again.stats.misses) == (1, 0)


def test_a_prepared_part_that_cannot_be_written_stops_the_preparation_not_as_a_bad_shard(tmp_path):
    """The same full disk under `data.cache.dir`: the transforms' output could not be written, and the
    shard whose output it was counted as bad (`on_bad_shard: skip` left it out for good)."""
    from openclaw.data.config import DataConfig
    from openclaw.data.prep import _ShardTask
    pq.write_table(pa.table({"x": np.arange(20_000, dtype=np.float32), "y": np.arange(20_000)}), tmp_path / "p0.parquet")
    transforms = DataConfig(train="x", transforms=[{"op": "cast", "column": "y", "dtype": "int32"}]).transforms
    (tmp_path / "out").mkdir()
    task = _ShardTask(str(tmp_path), {}, transforms, str(tmp_path / "out"), None, 1, {})
    item = {"i": 0, "path": str(tmp_path / "p0.parquet"), "size": 0, "mtime_ns": 0, "etag": ""}
    with _writes_past(64 * 1024):
        got = task(item)
    assert got["error"] is None and got["fatal"].startswith(f"could not write the prepared shard {tmp_path}/out/part-00000")
    assert "Errno 27" in got["fatal"] and "`data.cache.dir`" in got["fatal"] and not list((tmp_path / "out").iterdir())
    assert task(item)["rows"] == 20_000 and pq.read_table(tmp_path / "out" / "part-00000.parquet").num_rows == 20_000
