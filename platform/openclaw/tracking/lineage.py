"""Data lineage in the MLflow run (driver): each dataset as an MLflow dataset input (source URI, digest, rows,
shards, schema), its preparation (cache hit or miss, seconds), and the shards a run left out."""
from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from openclaw.data.sources import Source


class ParquetShards(Dataset):
    """A sharded Parquet dataset, described by its files (never read here)."""

    def __init__(self, source: Source, trained: Source, name: str, extra: dict[str, Any]):
        self._src, self._trained, self._extra = source, trained, extra
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local sources, same class
            warnings.simplefilter("ignore", UserWarning)
            resolved = resolve_dataset_source(source.uri)
        super().__init__(source=resolved, name=name)

    def _compute_digest(self) -> str:
        files = [[s.path, s.size, s.mtime_ns, s.rows] + ([s.etag] if s.etag else []) for s in self._src.shards]
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:10]

    @property
    def profile(self) -> dict[str, Any]:
        return {"rows": self._trained.num_rows, "shards": len(self._src.shards) + len(self._src.skipped),
                "bytes": self._src.num_bytes, "skipped_shards": len(self._trained.skipped), **self._extra}

    @property
    def schema(self):
        return None

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile),
                "schema": json.dumps({"arrow": {f.name: str(f.type) for f in self._src.schema}})}


def log_lineage(uri: str, run_id: str, prepared: dict[str, Any], resumed: bool = False) -> None:
    """The datasets as the run's inputs, their cache in its tags, and their rows, skipped shards and
    preparation as metrics at step 0: once, by the run's first session (a resumed one's would be a
    second point at the same step; its cache is in the tags)."""
    client = MlflowClient(uri)
    inputs, metrics, tags, skipped = [], {}, {}, {}
    for name, p in prepared.items():
        extra = {"cache": p.cache, **({"prepared_from": p.raw.uri} if p.source is not p.raw else {})}
        ds = ParquetShards(p.raw, p.source, name=name, extra=extra)
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", name)]))
        tags[f"openclaw.data.{name}.cache"] = p.cache
        if getattr(p, "cache_dir", None):
            tags["openclaw.data.cache_dir"] = p.cache_dir
        if p.cache != "off":
            metrics[f"data/{name}/prepare_s"] = p.prepare_s if p.cache == "miss" else 0.0
            metrics[f"data/{name}/cache_hit"] = float(p.cache == "hit")
        metrics[f"data/{name}/rows"] = float(p.source.num_rows)
        metrics[f"data/{name}/skipped_shards"] = float(len(p.source.skipped))
        if p.source.skipped:
            skipped[name] = [{"shard": path, "reason": why} for path, why in p.source.skipped]
    client.log_inputs(run_id, datasets=inputs)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for key, value in ({} if resumed else metrics).items():
        client.log_metric(run_id, key, value, step=0)
    if skipped:
        client.log_dict(run_id, skipped, "data/skipped_shards.json")
