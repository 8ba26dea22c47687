"""The `data:` section: sources, object-store access, transforms, caches and the bad-shard policy.

Pure pydantic, no Ray: validated with the rest of the config before any worker starts.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class S3Config(_Section):
    """Object-store access for `s3://` sources. Unset keys fall back to the standard AWS environment
    variables (`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    `AWS_SESSION_TOKEN`) and then to `~/.aws` and instance credentials. Secrets are never logged."""
    endpoint_url: str | None = None
    """An S3-compatible endpoint, e.g. `http://minio:9000`; unset: AWS itself."""
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None


class CacheConfig(_Section):
    dir: str | None = None
    """Where the prepared data (the transforms' output) is cached as Parquet shards, one entry per
    fingerprint of (source files, transforms, transform code). Unset: `<checkpoint.storage>/.data-cache`.
    On many nodes it must be a folder every node sees (a shared mount)."""
    max_bytes: int = Field(50 * 2**30, gt=0)
    """The cache's size bound; least-recently-used entries that no run is using are evicted to stay under it."""


class ShardCacheConfig(_Section):
    dir: str | None = None
    """Each node's local copy of shards read from object storage. Unset: `openclaw-shards` in the system
    temporary folder."""
    max_bytes: int = Field(20 * 2**30, gt=0)
    """Per node; least-recently-used shards are evicted to stay under it."""


class Normalize(_Section):
    """`(column - mean) / std`, as float32."""
    op: Literal["normalize"]
    column: str
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


class TokenizeBytes(_Section):
    """A string/binary column into fixed windows of `seq_len + 1` byte tokens (uint8), one row per window:
    the language-modeling layout (inputs are the first `seq_len`, targets the last `seq_len`)."""
    op: Literal["tokenize_bytes"]
    column: str
    seq_len: int = Field(128, gt=0)
    out: str = "x"


class ToTensor(_Section):
    """Scalar columns (or the names matching a prefix) into one fixed-size tensor column: the layout that
    trains fastest (one contiguous buffer per batch instead of dozens of columns)."""
    op: Literal["to_tensor"]
    columns: list[str] = Field(default_factory=list)
    prefix: str | None = None
    """Take every column whose name starts with this, in the schema's order (instead of `columns`)."""
    out: str = "x"
    dtype: Literal["float32", "float16", "int64", "int32", "uint8"] = "float32"


class Cast(_Section):
    op: Literal["cast"]
    column: str
    dtype: Literal["float32", "float16", "float64", "int64", "int32", "uint8"]


class UserTransform(_Section):
    """Your own `module:function(batch: dict[str, numpy.ndarray]) -> dict[str, numpy.ndarray]`.
    Its module's source is part of the cache fingerprint: editing it prepares the data again."""
    op: Literal["map_batches"]
    fn: str
    kwargs: dict = Field(default_factory=dict)

    @field_validator("fn")
    @classmethod
    def _path(cls, v: str) -> str:
        if ":" not in v or not all(v.split(":", 1)):
            raise ValueError(f"`fn` must be a `module:function` import path, got {v!r}")
        return v


Transform = Annotated[Union[Normalize, TokenizeBytes, ToTensor, Cast, UserTransform], Field(discriminator="op")]


class DataConfig(_Section):
    train: str
    """Training shards: a folder, a glob of Parquet files, or a URI (`s3://bucket/prefix`)."""
    val: str | None = None
    """Validation shards, same forms as `train`; evaluation is skipped when unset."""
    features: str = "x"
    """The input column (after transforms): a fixed-size list (tensor) column, or a scalar column."""
    label: str | None = "y"
    """The target column for classification; unset for language modeling."""
    s3: S3Config = Field(default_factory=S3Config)
    transforms: list[Transform] = Field(default_factory=list)
    """Run in order as Ray Data tasks, one per shard, before training; the output is cached (`data.cache`)."""
    cache: CacheConfig = Field(default_factory=CacheConfig)
    shard_cache: ShardCacheConfig = Field(default_factory=ShardCacheConfig)
    on_bad_shard: Literal["fail", "skip"] = "fail"
    """A shard that cannot be read or does not match the others: `fail` names it and stops before training;
    `skip` trains without it, and the run lists the skipped shards in MLflow."""
    shuffle_window_shards: int = Field(8, ge=0)
    """Samples are shuffled within windows of this many shards (the shards themselves are shuffled too);
    each worker holds at most two windows in memory. 0: shuffle the whole dataset (it must fit in memory)."""
