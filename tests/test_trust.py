"""Nothing read from a file runs code unless the user says so: a checkpoint or a logged model that names
a `module:function` model is refused, and a logged model loads from its weights, never by unpickling."""
import json
import pickle

import pytest
import torch

import openclaw
from openclaw.config import load_config
from openclaw.engine import checkpoint as ckpt
from openclaw.engine.models import MLP
from openclaw.errors import UntrustedCodeError

MARKER_CODE = "import pathlib; pathlib.Path({!r}).write_text('ran')"


def _malicious_checkpoint(tmp_path):
    """A checkpoint whose manifest checks out and whose config names `os:system` as the model."""
    marker = tmp_path / "marker"
    config = load_config(None, {"model": {"name": "os:system",
                                          "kwargs": {"command": f"touch {marker}"}}}, base={"data": {"train": "x"}})
    d = ckpt.save(tmp_path / "evil", model={}, trainer={}, state={"step": 1}, config=config.resolved())
    return d, marker


def test_a_checkpoint_naming_os_system_is_refused_and_nothing_runs(tmp_path):
    d, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(UntrustedCodeError, match=r"names the model `os:system`.*trust_code=True.*model_fn="):
        openclaw.load_model(d)
    from openclaw.cli import main
    assert main(["checkpoint", "consolidate", str(d), "--out", str(tmp_path / "m.pt")]) == 2  # a user error
    assert not marker.exists()


def test_model_fn_builds_a_user_model_without_importing_what_the_checkpoint_names(tmp_path):
    model = MLP(in_features=4, hidden=8, depth=1, num_classes=2)
    config = load_config(None, {"model": {"name": "mypkg.models:net", "kwargs": {"in_features": 4, "hidden": 8,
                                                                               "depth": 1, "num_classes": 2}}},
                         base={"data": {"train": "x"}})
    d = ckpt.save(tmp_path / "c", model=model.state_dict(), trainer={}, state={"step": 1}, config=config.resolved())
    loaded = openclaw.load_model(d, model_fn=lambda **kw: MLP(**kw))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(self.path),))


def test_a_logged_model_loads_from_its_weights_and_never_unpickles(digits_dir, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from openclaw.tracking.model import log_final_model, resolve_sources
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(None, {"data": {"train": str(digits_dir / "train")}, "tracking": {"uri": uri}})
    torch.manual_seed(0)
    model = MLP()
    d = ckpt.save(tmp_path / "c", model=model.state_dict(), trainer={}, state={"step": 1}, config=config.resolved())
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "art"))).info.run_id
    log_final_model(config, uri, run_id, str(d), resolve_sources(config.data))
    # Replace the MLflow model's data (a pickle or a torch.export archive) with a pickle that runs code.
    pickles = [p for p in (tmp_path / "art" / "models").rglob("data/*") if p.is_file()]
    assert pickles, sorted(str(p) for p in (tmp_path / "art").rglob("*"))
    marker = tmp_path / "marker"
    for p in pickles:
        p.write_bytes(pickle.dumps(_Payload(marker)))
    loaded = openclaw.load_model(run_id, tracking_uri=uri)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not marker.exists()
    logged = json.loads((next((tmp_path / "art").rglob("openclaw-model/config.json"))).read_text())
    assert logged["model"]["name"] == "mlp"
    mlflow.set_tracking_uri(uri)
