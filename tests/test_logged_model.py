"""The model a run logs to MLflow (a real sqlite store): each logged model keeps its own weights, its input
example has the data's dtype and enough rows to trace on, and its environment names no package that is
not openclaw's."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.tracking import MlflowClient

import openclaw
from openclaw.config import load_config
from openclaw.data.sources import resolve
from openclaw.engine import checkpoint as ckpt
from openclaw.engine.models import MLP
from openclaw.tracking.model import input_example, log_final_model, resolve_sources


def _logged(tmp_path, config, uri, run_id, seed):
    torch.manual_seed(seed)
    model = MLP()
    d = ckpt.save(tmp_path / f"c{seed}", model=model.state_dict(), trainer={}, state={"step": seed},
                  config=config.resolved())
    log_final_model(config, uri, run_id, str(d), resolve_sources(config.data))
    return model.state_dict()


def test_each_registered_version_loads_its_own_weights(digits_dir, tmp_path):
    """A run that logged its final model twice (a resume that trained on) registered v1 and v2; both were
    read from the run's one `openclaw-model/` folder, which the second overwrote: v1 loaded v2's weights."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(None, {"data": {"train": str(digits_dir / "train")},
                                "tracking": {"uri": uri, "register_as": "digits"}})
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "art"))).info.run_id
    first, second = _logged(tmp_path, config, uri, run_id, 1), _logged(tmp_path, config, uri, run_id, 2)
    same = lambda model, weights: all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),  # noqa: E731
                                                                         weights.values()))
    assert same(openclaw.load_model("models:/digits/1", tracking_uri=uri), first)
    assert same(openclaw.load_model("models:/digits/2", tracking_uri=uri), second)
    assert same(openclaw.load_model(run_id, tracking_uri=uri), second)  # the run's newest
    requirements = next((tmp_path / "art").rglob("requirements.txt")).read_text().split()
    assert not any(r.split("=")[0] == "openclaw" for r in requirements), requirements  # PyPI's is another project


def test_the_input_example_keeps_integers_and_reads_past_short_row_groups(tmp_path):
    """The example was float32 for every task but language modeling (a classifier of token ids then failed
    to export), and the first row group's first 2 rows: a first shard of 0 or 1 rows fixed the traced
    model's batch size to that."""
    data = tmp_path / "d"
    data.mkdir()
    ids = np.arange(12, dtype=np.int64).reshape(6, 2)
    column = lambda rows: pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 2)  # noqa: E731
    pq.write_table(pa.table({"x": column(ids[:1]), "y": [0]}), data / "part-0.parquet")  # one row
    pq.write_table(pa.table({"x": column(ids[1:]), "y": [1, 0, 1, 0, 1]}), data / "part-1.parquet")
    config = load_config(None, {"data": {"train": str(data)}})
    src = resolve(str(data), "data.train")
    example = input_example(config, src)
    assert example.dtype == np.int64 and example.tolist() == ids[:2].tolist()
    assert input_example(config, src, rows=7) is None  # fewer rows than that: no example (the pickle format)
