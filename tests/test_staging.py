"""Checkpoint staging folders: a killed worker's are removed by the next worker of its host, no one else's."""
import os

import pytest

from conftest import exited_pid
from openclaw.runtime import staging


def _plant(tmp, name: str) -> str:
    d = tmp / name
    (d / "shards").mkdir(parents=True)
    (d / "shards" / "model.pt").write_bytes(b"x" * 4096)
    return name


def test_only_this_hosts_folders_of_exited_processes_are_removed(tmp_path):
    host, dead = staging._host(), exited_pid()
    gone = _plant(tmp_path, f"openclaw-ckpt-{host}-{dead}-ab_c12")
    kept = [_plant(tmp_path, f"openclaw-ckpt-{host}-{os.getpid()}-live01"),         # a live process's
            _plant(tmp_path, f"openclaw-ckpt-other-host.example-{dead}-x1y2z3"),    # another host's
            _plant(tmp_path, "openclaw-ckpt-k3j2h1"),                              # a name it did not make
            _plant(tmp_path, f"openclaw-profile-{host}-{dead}-qwerty")]             # not a staging folder
    (tmp_path / f"openclaw-ckpt-{host}-{dead}-file01").write_text("a file, not a folder")

    assert staging.remove_stale(str(tmp_path)) == [tmp_path / gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [f"openclaw-ckpt-{host}-{dead}-file01"])
    assert staging.remove_stale(str(tmp_path)) == []


def test_a_host_name_with_dashes_and_odd_characters_still_parses(tmp_path, monkeypatch):
    monkeypatch.setattr(staging.socket, "gethostname", lambda: "worker-7/gpu pod-2")
    assert staging._host() == "worker-7_gpu_pod-2"
    d = staging.new_staging_dir()
    try:
        name = os.path.basename(d)
        assert name.startswith(f"openclaw-ckpt-worker-7_gpu_pod-2-{os.getpid()}-")
        m = staging._NAME.match(name)
        assert m and m["host"] == "worker-7_gpu_pod-2" and int(m["pid"]) == os.getpid()
    finally:
        os.rmdir(d)


def test_a_staging_folder_is_gone_after_its_block_even_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="the write failed"):  # the error goes on, not swallowed
        with staging.staging_dir() as d:
            (open(os.path.join(d, "f"), "w")).close()
            raise RuntimeError("the write failed")
    assert not os.path.exists(d)


def test_two_workers_of_a_node_sweeping_at_once_both_carry_on(tmp_path):
    """Both workers of a node sweep at their start. One removed a stale folder while the other was adding
    up its size: the walk of a folder that is gone raised FileNotFoundError, and that worker crashed
    before its first step (the three-SIGKILLs run spent a restart on it and gave up)."""
    import threading
    host, dead = staging._host(), exited_pid()
    for i in range(200):
        _plant(tmp_path, f"{staging.PREFIX}{host}-{dead}-r{i:03d}")
    errors, removed = [], []

    def sweep():
        try:
            removed.extend(staging.remove_stale(str(tmp_path)))
        except Exception as e:  # what crashed the worker
            errors.append(e)
    workers = [threading.Thread(target=sweep) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and not list(tmp_path.glob(f"{staging.PREFIX}*"))
    assert len(removed) == len(set(removed)) == 200  # each said removed once, by the worker that did
