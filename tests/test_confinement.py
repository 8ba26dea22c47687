"""Names from files and folders stay where they belong: checkpoint manifests, prepared-data manifests,
the node shard cache (per user, 0700, no planted links), leftovers swept, and every checkpoint counted
toward `checkpoint.keep`."""
import json
import os
import time

import pytest
import torch

from openclaw.engine import checkpoint as ckpt
from openclaw.errors import CheckpointError, DataError


def _checkpoint(d, step=1):
    return ckpt.save(d, model={"w": torch.ones(3)}, trainer={}, state={"step": step}, config={"name": "t"})


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/../../b", ""])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    d = _checkpoint(tmp_path / "c")
    (tmp_path / "outside").write_text("x")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0" * 64}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="which is not a file inside it"):
        ckpt.verify(d)


def test_a_prepared_cache_manifest_naming_a_path_is_refused(tmp_path):
    from openclaw.data.prep import _shard_name
    assert _shard_name("part-00001.parquet", str(tmp_path)) == "part-00001.parquet"
    for bad in ("../x.parquet", "/etc/passwd", "a/b.parquet", ".."):
        with pytest.raises(DataError, match="which is not a file in it"):
            _shard_name(bad, str(tmp_path))


def test_the_shard_cache_is_a_private_folder_and_refuses_a_shared_one(tmp_path):
    from openclaw.data.shard_cache import ShardCache, default_dir
    assert default_dir().endswith(f"openclaw-shards-{os.getuid()}")
    cache = ShardCache(str(tmp_path / "mine"), 1 << 20)
    assert oct(os.stat(cache.root).st_mode & 0o777) == "0o700"
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(DataError, match="chmod 700"):
        ShardCache(str(shared), 1 << 20)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(DataError, match="not a folder of this user's"):
        ShardCache(str(tmp_path / "link"), 1 << 20)


def test_the_shard_cache_never_writes_through_a_planted_link_and_sweeps_leftovers(tmp_path):
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from openclaw.data.shard_cache import ShardCache
    src = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), src)
    cache = ShardCache(str(tmp_path / "cache"), 1 << 20)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    # a link planted where this process will write its part file: replaced, never followed
    import hashlib
    info = os.stat(src)
    key = hashlib.sha1(f"{src}|{info.st_size}|{info.st_mtime_ns}".encode()).hexdigest()[:24]
    (tmp_path / "cache" / f"{key}.parquet.{os.getpid()}.part").symlink_to(victim)
    body = cache.read(pafs.LocalFileSystem(), str(src), info.st_size, info.st_mtime_ns)
    assert len(body) == info.st_size and victim.read_text() == "keep me"
    old = time.time() - 2 * 3600
    for name in ("dead.parquet.99.part", "gone.lock"):
        (tmp_path / "cache" / name).write_text("")
        os.utime(tmp_path / "cache" / name, (old, old))
    ShardCache(str(tmp_path / "cache"), 1 << 20)  # a cache sweeps what died processes left when it opens
    assert not (tmp_path / "cache" / "dead.parquet.99.part").exists() and not (tmp_path / "cache" / "gone.lock").exists()
    assert (tmp_path / "cache" / f"{key}.lock").exists() and (tmp_path / "cache" / f"{key}.json").exists()


def test_the_shard_cache_sweeps_a_shard_left_without_its_json_unless_a_fetch_holds_it(tmp_path):
    """A crash between a fetch's two files (or an eviction's two unlinks) left a `.parquet` that neither
    eviction nor the sweep looked at: bytes over `max_bytes`, for good."""
    import fcntl
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from openclaw.data.shard_cache import ShardCache
    root = tmp_path / "cache"
    for i in range(2):
        pq.write_table(pa.table({"x": [i] * 100}), tmp_path / f"s{i}.parquet")
        info = os.stat(tmp_path / f"s{i}.parquet")
        ShardCache(str(root), 1 << 20).read(pafs.LocalFileSystem(), str(tmp_path / f"s{i}.parquet"), info.st_size,
                                            info.st_mtime_ns)
    orphan, held = sorted(p.name[:-5] for p in root.glob("*.json"))
    old = time.time() - 2 * 3600
    for key in (orphan, held):
        (root / f"{key}.json").unlink()
        os.utime(root / f"{key}.parquet", (old, old))
    fd = os.open(root / f"{held}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a fetch of this key, between its two files
    try:
        ShardCache(str(root), 1 << 20)  # a cache sweeps what died processes left when it opens
        assert not (root / f"{orphan}.parquet").exists() and (root / f"{held}.parquet").exists()
    finally:
        os.close(fd)
    assert ShardCache(str(root), 1 << 20).sweep() == [] and not (root / f"{held}.parquet").exists()  # let go


def test_the_shard_cache_sweep_leaves_the_lock_of_a_fetch_under_way(tmp_path):
    """An evicted shard's lock file stays, with its old time: a worker fetching that shard again holds it,
    with no `.json` yet, and a cache opening on the node (a worker's start, a preparing task) removed it
    as an orphan, so a third process took the key's lock at the same time and fetched the shard again."""
    import fcntl
    from openclaw.data.shard_cache import ShardCache
    root = tmp_path / "cache"
    cache = ShardCache(str(root), 1 << 20)
    old = time.time() - 2 * 3600
    for key in ("fetching", "dead"):
        (root / f"{key}.lock").touch()
        os.utime(root / f"{key}.lock", (old, old))
    with cache._lock("fetching"):
        assert ShardCache(str(root), 1 << 20).sweep() == [] and (root / "fetching.lock").exists()
        with cache._lock("fetching", blocking=False) as got:
            assert not got  # still one lock
    assert not (root / "dead.lock").exists()  # swept by the cache that opened while the fetch held its own
    fd = os.open(root / "fetching.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    os.close(fd)


def test_the_prepared_cache_sweeps_what_dead_preparers_left_but_not_what_a_live_one_writes(tmp_path):
    import fcntl
    from openclaw.data.prep_cache import PrepCache
    cache = PrepCache(str(tmp_path / "c"), 1 << 30)
    (tmp_path / "c" / ".tmp" / "dead-1234abcd").mkdir()
    (tmp_path / "c" / ".locks" / "dead.lock").write_text("")
    (tmp_path / "c" / ".tmp" / "live-5678abcd").mkdir()
    fd = os.open(tmp_path / "c" / ".locks" / "live.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a preparer at work
    try:
        PrepCache(str(tmp_path / "c"), 1 << 30)  # sweeps when it opens
        assert not (tmp_path / "c" / ".tmp" / "dead-1234abcd").exists()
        assert (tmp_path / "c" / ".locks" / "dead.lock").exists()  # lock files stay (`PrepCache.sweep`)
        assert (tmp_path / "c" / ".tmp" / "live-5678abcd").exists() and (tmp_path / "c" / ".locks" / "live.lock").exists()
    finally:
        os.close(fd)
    assert cache.root == str(tmp_path / "c")


def test_checkpoints_ray_never_registered_count_toward_keep_and_those_it_tracks_are_left_to_it(tmp_path):
    from openclaw.runtime.checkpoint_store import prune
    run = tmp_path / "run"
    names = [f"checkpoint_2026-01-0{i}_00-00-00.000000" for i in range(1, 8)]
    for i, name in enumerate(names):
        _checkpoint(run / name, step=i)
    assert prune(str(run), keep=2) == []  # Ray has registered nothing yet: nothing is known to be orphaned
    (run / names[3] / "manifest.json").unlink()  # a background write cut short: no manifest
    # Ray tracks 0, 2 and 4 (it deletes those itself); 1 and 3 it never registered; 5 and 6 are newer than
    # anything it tracks, so it may be about to register them.
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": names[i]} for i in (0, 2, 4)],
                "latest_checkpoint_result": {"checkpoint_dir_name": names[4]}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    doomed = prune(str(run), keep=2)
    left = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_2"))
    assert left == [names[0], names[2], names[4], names[5], names[6]]
    assert sorted(os.path.basename(p) for p in doomed) == [names[1], names[3]]
