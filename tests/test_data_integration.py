"""Data at scale, end to end on real Ray and a real S3-compatible server: shards read from object
storage, transforms run as Ray Data tasks and cached, bad shards skipped and listed, lineage in MLflow."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

import openclaw
from conftest import digits_config
from openclaw.errors import DataError


def _with_bad_shard(digits_dir, folder):
    shutil.copytree(digits_dir / "train", folder)
    good = pq.read_table(folder / "part-00000.parquet")
    pq.write_table(good, folder / "part-00009.parquet")
    body = bytearray((folder / "part-00009.parquet").read_bytes())
    body[8:60] = b"\xab" * 52  # page headers destroyed; the footer (schema, row counts) still reads
    (folder / "part-00009.parquet").write_bytes(bytes(body))
    return folder


def test_s3_data_is_transformed_once_cached_and_recorded_in_mlflow(ray_local, s3_server, digits_dir, tmp_path,
                                                                   mlflow_uri, capsys):
    train_uri = s3_server.upload(_with_bad_shard(digits_dir, tmp_path / "src"), "bkt/digits/train")
    val_uri = s3_server.upload(digits_dir / "val", "bkt/digits/val")
    common = {"data.train": train_uri, "data.val": val_uri, "data.s3.endpoint_url": s3_server.endpoint,
              "data.s3.secret_access_key": "testing",  # also in the environment; here to check it is never logged
              "data.transforms": [{"op": "normalize", "column": "x", "mean": 0.5, "std": 0.5}],
              "data.on_bad_shard": "skip", "data.cache.dir": str(tmp_path / "cache"),
              "data.shard_cache.dir": str(tmp_path / "shards"),
              "train.max_steps": 30, "train.log_every": 10, "checkpoint.every_steps": 30, "train.eval_every": 0}
    first = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="s3-first", **common))
    out = capsys.readouterr()
    assert "data.train: 1438 rows in 4 shard(s), prepared in" in out.out
    assert "skipped 1 bad shard(s)" in out.err and "part-00009.parquet could not be read" in out.err

    # the cache entry holds the transformed shards, in the source's order
    entries = list((tmp_path / "cache" / "entries").iterdir())
    assert len(entries) == 2  # train and val
    train_entry = next(e for e in entries if json.loads((e / "manifest.json").read_text())["source"] == train_uri)
    manifest = json.loads((train_entry / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"part-{i:05d}.parquet" for i in range(4)]
    raw = pq.read_table(digits_dir / "train" / "part-00002.parquet").column("x").to_pylist()
    done = pq.read_table(train_entry / "part-00002.parquet").column("x").to_pylist()
    assert np.allclose(done, (np.array(raw) - 0.5) / 0.5)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(first.run_id)
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}
    train_ds = inputs["train"]
    assert json.loads(train_ds.source)["uri"] == train_uri and train_ds.digest
    profile = json.loads(train_ds.profile)
    assert (profile["rows"], profile["shards"], profile["skipped_shards"], profile["cache"]) == (1438, 5, 1, "miss")
    assert run.data.tags["openclaw.data.train.cache"] == "miss" and run.data.metrics["data/train/skipped_shards"] == 1
    assert run.data.metrics["data/train/prepare_s"] > 0
    skipped = json.loads(open(client.download_artifacts(first.run_id, "data/skipped_shards.json", str(tmp_path))).read())
    assert [s["shard"].rsplit("/", 1)[1] for s in skipped["train"]] == ["part-00009.parquet"]
    config_yaml = open(client.download_artifacts(first.run_id, "config.yaml", str(tmp_path))).read()
    assert "testing" not in config_yaml and "secret_access_key: '***'" in config_yaml
    assert run.data.metrics["perf/ingest_rows_per_s"] > 0

    # a second run with the same data and transforms skips the preparation and trains on the same samples
    second = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="s3-second", **common))
    assert "data.train: 1438 rows in 4 shard(s), found in the cache" in capsys.readouterr().out
    again = client.get_run(second.run_id).data
    assert again.tags["openclaw.data.train.cache"] == "hit" and again.metrics["data/train/cache_hit"] == 1
    assert second.metrics["train/loss"] == first.metrics["train/loss"]


def test_a_bad_shard_fails_preparation_naming_it(ray_local, digits_dir, tmp_path, mlflow_uri):
    folder = _with_bad_shard(digits_dir, tmp_path / "src")
    cfg = digits_config(digits_dir, tmp_path, mlflow_uri, **{
        "data.train": str(folder), "data.transforms": [{"op": "cast", "column": "y", "dtype": "int64"}]})
    with pytest.raises(DataError, match=r"shard .*part-00009.parquet could not be read.*on_bad_shard: skip"):
        openclaw.train(cfg)


BIG_RUN = r"""
import json, sys
import ray
import openclaw
ray.init(address="local", num_cpus=4, object_store_memory={store}, include_dashboard=False, log_to_driver=False)
result = openclaw.train(openclaw.load_config(base=json.loads(sys.argv[1])))
print("RESULT", json.dumps(result.metrics))
"""


def test_a_dataset_five_times_the_object_store_streams_through_a_whole_epoch(tmp_path):
    """Workers hold two shuffle windows, never the dataset, and the object store carries no samples."""
    import subprocess
    import sys

    from conftest import prepare
    store = 80 * 2**20
    data = prepare("synthetic", tmp_path / "big", "--rows", "1600000", "--features", "64", "--shards", "16")
    size = sum(p.stat().st_size for p in (data / "train").glob("*.parquet"))
    assert size > 5 * store
    cfg = {"name": "big", "model": {"name": "mlp", "kwargs": {"in_features": 64, "hidden": 32, "depth": 1,
                                                              "num_classes": 10}},
           "data": {"train": str(data / "train"), "shuffle_window_shards": 2},
           "train": {"global_batch_size": 16384, "micro_batch_size": 8192, "max_steps": 97, "log_every": 97,
                     "eval_every": 0},
           "scaling": {"min_workers": 2, "max_workers": 2}, "checkpoint": {"storage": str(tmp_path / "runs"),
                                                                          "every_steps": 97},
           "tracking": {"enabled": False}}
    out = subprocess.run([sys.executable, "-c", BIG_RUN.format(store=store), json.dumps(cfg)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert metrics["step"] == 97 and metrics["train/epoch"] == 0  # 97 x 16384 = 1,589,248 of 1.6 M: one epoch
