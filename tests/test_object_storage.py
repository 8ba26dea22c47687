"""Object storage without Ray, on moto's real S3 server on loopback: a shard rewritten in place is fetched
again, never served stale from the node's shard cache; checkpoint storage's filesystem keeps its endpoint
and credentials on its way to Ray's controller; the prepared-data cache's default and a URI storage."""
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import digits_config
from openclaw.data.filesystems import ray_storage, storage_filesystem, storage_uri
from openclaw.data.shard_cache import ShardCache
from openclaw.data.sources import resolve
from openclaw.data.stream import ShardedData, shard_specs
from openclaw.errors import ConfigError, DataError


def _put(fs, path: str, offset: int) -> None:
    """A 100-row shard whose values start at `offset`; uncompressed and plain, so that every version has the
    same size."""
    table = pa.table({"x": np.arange(100, dtype=np.float32) + offset, "y": np.arange(100, dtype=np.int64) % 10})
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f, compression="none", use_dictionary=False)


def _read_all(uri, src, s3, cache) -> np.ndarray:
    """Every row's `x`, as a worker reads it: through the node's shard cache."""
    data = ShardedData(uri, shard_specs(src.shards), "x", "y", s3=s3, shard_cache=cache)
    return data.batch(np.arange(100))["x"].numpy()


def test_a_shard_rewritten_in_place_with_the_same_size_and_second_is_fetched_again(s3_server, tmp_path):
    fs, s3, uri = s3_server.filesystem(), {"endpoint_url": s3_server.endpoint}, "s3://bkt/v"
    fs.create_dir("bkt")
    for _ in range(5):  # S3 keeps modification times to the second: rewrite within the same one
        _put(fs, "bkt/v/part-0.parquet", 0)
        old = resolve(uri, "data.train", s3)
        cache = ShardCache(str(tmp_path / "shards"), max_bytes=10**9)
        assert np.array_equal(_read_all(uri, old, s3, cache), np.arange(100))
        _put(fs, "bkt/v/part-0.parquet", 1000)
        new = resolve(uri, "data.train", s3)
        if new.shards[0].mtime_ns == old.shards[0].mtime_ns:
            break
    # what the listing tells apart is neither the size nor the modification time
    assert (new.shards[0].size, new.shards[0].mtime_ns) == (old.shards[0].size, old.shards[0].mtime_ns)

    again = ShardCache(str(tmp_path / "shards"), max_bytes=10**9)  # the next job on this node
    assert np.array_equal(_read_all(uri, new, s3, again), np.arange(100) + 1000)
    assert (again.stats.misses, again.stats.hits) == (1, 0)
    # and the new version is cached in turn
    third = ShardCache(str(tmp_path / "shards"), max_bytes=10**9)
    assert np.array_equal(_read_all(uri, new, s3, third), np.arange(100) + 1000)
    assert (third.stats.misses, third.stats.hits) == (0, 1)

    # a job that resolved the old version and reads the shard only now (on a node that never cached it)
    # is told the dataset changed under it, instead of training on rows its plan never saw
    with pytest.raises(DataError, match=r"shard bkt/v/part-0.parquet could not be read .*changed"):
        _read_all(uri, old, s3, ShardCache(str(tmp_path / "other-node"), max_bytes=10**9))


def test_checkpoint_storage_keeps_its_endpoint_and_credentials_when_pickled_for_rays_controller(s3_server, monkeypatch):
    s3_server.filesystem().create_dir("ckpt")
    # the endpoint named by the URI's own options, or by the standard environment
    by_uri, _ = storage_filesystem(f"s3://ckpt/runs?endpoint_override=127.0.0.1:{s3_server.port}&scheme=http")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    path, by_env = ray_storage("s3://ckpt/runs")
    assert path == "ckpt/runs" and ray_storage("/tmp/runs") == ("/tmp/runs", None)
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # as in Ray's controller
        monkeypatch.delenv(key)
    for name, fs in (("by-uri", by_uri), ("by-env", by_env)):
        there = pickle.loads(pickle.dumps(fs))
        with there.open_output_stream(f"ckpt/runs/{name}") as f:
            f.write(b"written where the driver said")
        assert s3_server.filesystem().get_file_info(f"ckpt/runs/{name}").size == 29
    # a path Ray reports inside that filesystem is a URI again for the user
    assert storage_uri("s3://ckpt/runs", "ckpt/runs/job/checkpoint_1") == "s3://ckpt/runs/job/checkpoint_1"
    assert storage_uri("/tmp/runs", "/tmp/runs/job/checkpoint_1") == "/tmp/runs/job/checkpoint_1"
    local, root = storage_filesystem("runs")
    assert isinstance(local, pafs.LocalFileSystem) and root == "runs"


TRANSFORM = [{"op": "cast", "column": "y", "dtype": "int64"}]


def test_the_prepared_data_cache_needs_a_folder_when_checkpoint_storage_is_a_uri(digits_dir, tmp_path):
    uri_storage = {"checkpoint.storage": "s3://ckpt/runs"}
    for needs_preparation in ({"data.transforms": TRANSFORM}, {"data.on_bad_shard": "skip"}):
        with pytest.raises(ConfigError, match=r"`data.cache.dir` is unset.*`checkpoint.storage` is the URI "
                                              r"s3://ckpt/runs.*Set `data.cache.dir` to a local folder"):
            digits_config(digits_dir, tmp_path, "sqlite://", **uri_storage, **needs_preparation)
    # set, or with nothing to prepare, or with folder storage (the default, under it), it loads
    cfg = digits_config(digits_dir, tmp_path, "sqlite://", **uri_storage, **{"data.transforms": TRANSFORM,
                                                                             "data.cache.dir": str(tmp_path / "c")})
    assert cfg.data.cache.dir == str(tmp_path / "c")
    assert digits_config(digits_dir, tmp_path, "sqlite://", **uri_storage).data.cache.dir is None
    assert digits_config(digits_dir, tmp_path, "sqlite://", **{"data.transforms": TRANSFORM}).data.cache.dir is None
