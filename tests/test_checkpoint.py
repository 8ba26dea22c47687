import json

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
