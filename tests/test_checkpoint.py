import json
import os

import pytest
import torch

from openclaw.engine import checkpoint as ckpt
from openclaw.errors import CheckpointError, ConfigError


def _save(d):
    return ckpt.save(d, model={"w": torch.arange(1000.0)}, trainer={"optimizer": {"state": {}, "param_groups": []}},
                     state={"step": 7, "mlflow_run_id": "abc"}, config={"name": "t"})


def test_round_trip_with_manifest(tmp_path):
    d = _save(tmp_path / "c")
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "trainer.pt", "state.pt", "config.json"} and manifest["step"] == 7
    loaded = ckpt.load(d)
    assert torch.equal(loaded["model"]["w"], torch.arange(1000.0)) and loaded["state"]["step"] == 7


def test_truncated_file_is_detected(tmp_path):
    d = _save(tmp_path / "c")
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.pt is \d+ bytes, the manifest says \d+"):
        ckpt.load(d)


def test_flipped_byte_is_detected(tmp_path):
    d = _save(tmp_path / "c")
    data = bytearray((d / "state.pt").read_bytes())
    data[-20] ^= 0xFF
    (d / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="state.pt fails its sha256 check"):
        ckpt.verify(d)


def test_missing_manifest_means_unfinished(tmp_path):
    d = _save(tmp_path / "c")
    (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not written in full"):
        ckpt.load(d)


def test_a_run_folder_given_for_a_checkpoint_names_its_newest_whole_checkpoint(tmp_path):
    run = tmp_path / "run"
    _save(run / "checkpoint_2026-01-01_00-00-00.000001")
    whole = _save(run / "checkpoint_2026-01-02_00-00-00.000001")
    (_save(run / "checkpoint_2026-01-03_00-00-00.000001") / "manifest.json").unlink()  # newer, not written in full
    with pytest.raises(ConfigError, match=rf"{run} is a run's folder, not one checkpoint: pass one of its "
                                          rf"checkpoint_\* folders \(the newest written in full is {whole}\)"):
        ckpt.load(run)


def test_load_refuses_pickled_code(tmp_path):
    d = _save(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, d / "model.pt")
    ckpt.save(d, model={"x": Evil()}, trainer={}, state={"step": 1}, config={})
    with pytest.raises(Exception, match="Weights only load failed|Unsupported"):
        ckpt.load(d)


def _restore_while_a_save_publishes(rank: int, world: int, root: str) -> tuple[str, int] | None:
    """`restore` on each rank, rank 1's own listing taken a moment before a background save created the
    newest folder (files, no manifest yet), rank 0's after: as a rollback during an async save lists."""
    import torch
    from ray.train import Checkpoint

    import openclaw.runtime.checkpoint_store as store
    names = sorted(n for n in os.listdir(root) if n.startswith("checkpoint_"))
    seen = names if rank == 0 else names[:-1]
    store.checkpoints_newest_first = lambda run_dir: [Checkpoint(os.path.join(root, n)) for n in reversed(seen)]
    store.restore_engine = lambda engine, d, parts: None  # the folders hold no model: the choice is the test

    class Engine:
        device = torch.device("cpu")

    class Tracker:
        def event(self, *a, **k): ...

        def progress(self, *a, **k): ...
    loaded = store.restore(root, Tracker(), Engine(), lambda state, path: None)
    return (os.path.basename(loaded["path"]), loaded["state"]["step"]) if loaded else None


def test_ranks_restore_the_same_checkpoint_while_a_background_save_creates_a_folder(tmp_path):
    """Each rank once listed the folder itself: both skipped the unfinished newest folder (rank 0's list)
    and the newest whole one (rank 1's, paired with rank 0's verdict on the unfinished one), then rank 0
    loaded step 100 and rank 1 step 50."""
    from parallel_harness import spawn
    for i, step in enumerate((50, 100)):
        ckpt.save(tmp_path / f"checkpoint_2026-01-01_00-00-0{i}.000000", model={}, trainer={}, state={"step": step},
                  config={})
    (tmp_path / "checkpoint_2026-01-01_00-00-09.000000").mkdir()  # being published: no manifest yet
    assert spawn(2, _restore_while_a_save_publishes, str(tmp_path)) == [("checkpoint_2026-01-01_00-00-01.000000", 100)] * 2


class _Quiet:
    def event(self, *a, **k): ...

    def progress(self, *a, **k): ...


class _CPU:
    device = torch.device("cpu")


def _restored_step(run, monkeypatch) -> int | None:
    """The step `restore` loads from `run` (its folders hold no model: the choice is the test)."""
    import openclaw.runtime.checkpoint_store as store
    monkeypatch.setattr(store, "restore_engine", lambda engine, d, parts: None)
    loaded = store.restore(str(run), _Quiet(), _CPU(), lambda state, path: None)
    return loaded["state"]["step"] if loaded else None


def test_a_resume_walks_checkpoints_by_step_not_by_a_name_in_local_time(tmp_path, monkeypatch):
    """Folders were named in local time and walked by name: after the autumn daylight-saving change (01:50
    then, 30 minutes later, 01:20) or a restart with rank 0 in another time zone, a resume loaded the older
    checkpoint. New names are in UTC, and the walk orders by each manifest's step, then by name."""
    from openclaw.runtime.checkpoint_store import checkpoint_dir_name, listed
    run = tmp_path / "run"
    for name, step in (("checkpoint_2025-11-02_01-50-00.000000", 100), ("checkpoint_2025-11-02_01-20-00.000000", 200),
                       ("checkpoint_2025-11-02_01-40-00.000000", 200)):  # 200 twice: a replay; the later name wins
        ckpt.save(run / name, model={"w": torch.ones(2)}, trainer={}, state={"step": step}, config={})
    (run / "checkpoint_2025-11-02_09-00-00.000000").mkdir()  # being written: no manifest, walked last
    order = [(os.path.basename(c.path), s) for c, s in listed(str(run))]
    assert _restored_step(run, monkeypatch) == 200
    assert order == [("checkpoint_2025-11-02_01-40-00.000000", 200), ("checkpoint_2025-11-02_01-20-00.000000", 200),
                     ("checkpoint_2025-11-02_01-50-00.000000", 100), ("checkpoint_2025-11-02_09-00-00.000000", None)]
    import datetime
    utc = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    named = datetime.datetime.strptime(checkpoint_dir_name(), "checkpoint_%Y-%m-%d_%H-%M-%S.%f")
    assert abs((named - utc).total_seconds()) < 60  # UTC, whatever this machine's zone


def test_prune_keeps_the_checkpoint_the_attempt_restored(tmp_path):
    """Ray had registered step 200, whose model.pt was then found truncated; the restore skipped it and
    loaded step 100, which Ray never registered, and prune(keep=1) deleted that one: the next rollback
    or failure started the run over from step 0."""
    from openclaw.runtime.checkpoint_store import prune
    run = tmp_path / "run"
    old, new = "checkpoint_2026-01-01_10-00-00.000000", "checkpoint_2026-01-01_11-00-00.000000"
    ckpt.save(run / old, model={"w": torch.ones(2)}, trainer={}, state={"step": 100}, config={})
    ckpt.save(run / new, model={"w": torch.ones(2)}, trainer={}, state={"step": 200}, config={})
    (run / new / "model.pt").write_bytes(b"0123456789")  # truncated after Ray registered it
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": new}], "latest_checkpoint_result": {"checkpoint_dir_name": new}}))
    assert prune(str(run), keep=1, loaded=str(run / old)) == [] and (run / old / "manifest.json").exists()
    assert prune(str(run), keep=1) == [str(run / old)]  # (what it did before: the restored one, gone)


@pytest.mark.parametrize("manifest", [b"\xff\xfe not utf-8", b"[1, 2]", b'{"format": "whole"}',
                                      b'{"files": {"model.pt": 3}}', b'{"files": ["model.pt"]}'])
def test_a_malformed_manifest_is_a_checkpoint_error_that_a_resume_skips(tmp_path, manifest, monkeypatch):
    """A manifest that was JSON of another shape, or not UTF-8, raised KeyError, TypeError or
    UnicodeDecodeError, which the restore does not catch: the resume crashed instead of loading the
    checkpoint before it (as `openclaw checkpoint list` said it would)."""
    run = tmp_path / "run"
    ckpt.save(run / "checkpoint_2026-01-01_00-00-00.000000", model={"w": torch.ones(2)}, trainer={},
              state={"step": 50}, config={})
    bad = ckpt.save(run / "checkpoint_2026-01-02_00-00-00.000000", model={"w": torch.ones(2)}, trainer={},
                    state={"step": 100}, config={})
    (bad / "manifest.json").write_bytes(manifest)
    with pytest.raises(CheckpointError, match="manifest.json is (corrupt|malformed)"):
        ckpt.verify(bad)
    assert _restored_step(run, monkeypatch) == 50


def test_shards_that_do_not_load_say_why_on_each_rank(tmp_path):
    """DCP's message leads with each rank's traceback, and its first 500 characters were all the error kept:
    a header, without the cause (a key the checkpoint does not hold)."""
    import torch.distributed.checkpoint as dcp
    from openclaw.engine.sharded import load_shards
    dcp.save({"model.w": torch.ones(3)}, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    with pytest.raises(CheckpointError, match=r"could not be loaded: rank 0: RuntimeError: Missing key in checkpoint "
                                              r"state_dict: model\.v"):
        load_shards({"model.v": torch.zeros(3)}, tmp_path)


@pytest.mark.parametrize("step", ["20", 20.0, None])
def test_checkpoint_list_orders_a_manifest_whose_step_is_no_whole_number_as_a_resume_does(tmp_path, step):
    """A resume reads such a step as -1 (after every good checkpoint); the list sorted on the raw value:
    `20.0` was marked where a resume starts, and `"20"` crashed the sort (str < int)."""
    import json

    from openclaw.launch.checkpoint_list import list_checkpoints
    for name, s in (("checkpoint_a", 10), ("checkpoint_b", step)):
        d = _save(tmp_path / name)
        (d / "manifest.json").write_text(json.dumps({**json.loads((d / "manifest.json").read_text()), "step": s}))
    got = list_checkpoints(str(tmp_path), quick=True)
    assert [c.name for c in got] == ["checkpoint_a", "checkpoint_b"] and got[0].problem is None


def test_a_sharded_background_save_writes_on_a_gloo_group_of_its_own_at_one_worker_too():
    """The group was made only above one worker: at one (an elastic FSDP run shrunk to it, or resumed on one
    machine), DCP's async save ran on the default group, NCCL alone on a GPU, and every save failed with
    "A CPU backend must be enabled for async save"."""
    from parallel_harness import background_groups, spawn
    assert spawn(1, background_groups) == [["gloo", None, None]]
    assert spawn(2, background_groups) == [["gloo", None, None]] * 2


def test_a_manifest_that_leaves_out_a_file_its_format_holds_is_refused_and_a_resume_goes_back(tmp_path, monkeypatch):
    """`verify` checked the files the manifest listed, and no others: one that left out `model.pt` (cut short
    beside it), or listed none, passed, and every attempt then failed on the file with torch's own error,
    though an older checkpoint was whole. `checkpoint list` judges it as the resume does."""
    import json

    from openclaw.launch.checkpoint_list import list_checkpoints
    run = tmp_path / "run"
    ckpt.save(run / "checkpoint_2026-01-01_00-00-00.000000", model={"w": torch.ones(2)}, trainer={},
              state={"step": 50}, config={})
    bad = ckpt.save(run / "checkpoint_2026-01-02_00-00-00.000000", model={"w": torch.ones(2)}, trainer={},
                    state={"step": 100}, config={})
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["files"]["model.pt"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "model.pt").write_bytes(b"cut short")
    with pytest.raises(CheckpointError, match="manifest.json does not list model.pt, which a whole checkpoint holds"):
        ckpt.verify(bad)
    assert _restored_step(run, monkeypatch) == 50
    listed = {c.name: c.problem for c in list_checkpoints(str(run), quick=True)}
    assert "does not list model.pt" in listed[bad.name] and listed["checkpoint_2026-01-01_00-00-00.000000"] is None
    (bad / "manifest.json").write_text(json.dumps({**manifest, "files": {}}))
    with pytest.raises(CheckpointError, match="does not list model.pt, trainer.pt, state.pt, config.json"):
        ckpt.verify(bad)
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format": "zipped"}))
    with pytest.raises(CheckpointError, match="names the format 'zipped'"):
        ckpt.verify(bad)


def test_a_file_that_leads_outside_its_checkpoint_by_a_link_is_refused(tmp_path):
    """Names were checked, not where they lead: `model.pt` as a symbolic link to a file elsewhere passed."""
    import shutil
    d = _save(tmp_path / "c")
    shutil.move(d / "model.pt", tmp_path / "elsewhere.pt")
    (d / "model.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(CheckpointError, match="model.pt leads outside it"):
        ckpt.verify(d)


@pytest.mark.parametrize("edit, said", [({"size": 4016.0}, "malformed"), ({"format": ["whole"]}, "names the format")])
def test_checkpoint_list_refuses_a_manifest_the_resume_refuses(tmp_path, edit, said):
    """The list had checks of its own: a size written as a float listed as where a resume starts (which
    refuses it), and a format that was no string failed the command with a TypeError."""
    import json

    from openclaw.launch.checkpoint_list import list_checkpoints
    d = _save(tmp_path / "checkpoint_a")
    manifest = json.loads((d / "manifest.json").read_text())
    if "size" in edit:
        manifest["files"]["model.pt"]["size"] = edit["size"]
    else:
        manifest.update(edit)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=said):
        ckpt.verify(d)
    assert said in list_checkpoints(str(tmp_path), quick=True)[0].problem
