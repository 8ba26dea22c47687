"""The `data:` section: sources, object-store access, transforms, caches and the bad-shard policy.

Pure pydantic, no Ray: validated with the rest of the config before any worker starts.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator

from openclaw.section import Section


class S3Config(Section):
    """Object-store access for `s3://` sources. Unset keys fall back to the standard AWS environment
    variables (`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    `AWS_SESSION_TOKEN`) and then to `~/.aws` and instance credentials. Secrets are never logged."""
    endpoint_url: str | None = None
    """An S3-compatible endpoint, e.g. `http://minio:9000`; unset: AWS itself."""
    region: str | None = None
    """The bucket's region; unset: `AWS_DEFAULT_REGION`, else us-east-1."""
    access_key_id: str | None = None
    """Access key id; unset: the AWS environment, `~/.aws` or the instance's role."""
    secret_access_key: str | None = None
    """Secret key (never logged or printed); prefer the AWS environment or an instance role."""
    session_token: str | None = None
    """Session token of temporary credentials (never logged or printed)."""


class CacheConfig(Section):
    dir: str | None = None
    """Where the prepared data (the transforms' output) is cached as Parquet shards, one entry per
    fingerprint of (source files, transforms, transform code). Unset: `<checkpoint.storage>/.data-cache`,
    where `checkpoint.storage` is a folder; with a URI `checkpoint.storage` (s3://...) it must be set. On
    many nodes it must be a folder every node sees (a shared mount)."""
    max_bytes: int = Field(50 * 2**30, gt=0)
    """The cache's size bound; least-recently-used entries that no run is using are evicted to stay under it."""

    @field_validator("dir")
    @classmethod
    def _a_folder(cls, v: str | None) -> str | None:
        return _local_folder(v, "a shared mount every node sees")


class ShardCacheConfig(Section):
    dir: str | None = None
    """Each node's local copy of shards read from object storage. Unset: `openclaw-shards-<uid>` in the
    system temporary folder (one per user, 0700)."""
    max_bytes: int = Field(20 * 2**30, gt=0)
    """Per node; least-recently-used shards are evicted to stay under it."""

    @field_validator("dir")
    @classmethod
    def _a_folder(cls, v: str | None) -> str | None:
        return _local_folder(v, "a local disk of each node")


def _local_folder(v: str | None, where: str) -> str | None:
    """A cache lives in a folder (file locks, renames): a URI would become a local folder named `s3:`."""
    if v is not None and "://" in v:
        raise ValueError(f"must be a folder ({where}), not a URI like {v.split('://')[0]}://...; the cache "
                         f"holds file locks and renames, which object storage has not")
    return v


class Normalize(Section):
    """`(column - mean) / std`, as float32."""
    op: Literal["normalize"]
    """normalize"""
    column: str
    """The column to normalize (in place)."""
    mean: float = 0.0
    """Subtracted first."""
    std: float = Field(1.0, gt=0)
    """Then divided by."""


class TokenizeBytes(Section):
    """A string/binary column into fixed windows of `seq_len + 1` byte tokens (uint8), one row per window:
    the language-modeling layout (inputs are the first `seq_len`, targets the last `seq_len`)."""
    op: Literal["tokenize_bytes"]
    """tokenize_bytes"""
    column: str
    """The string or binary column to tokenize."""
    seq_len: int = Field(128, gt=0)
    """Tokens a model sees per sample; each row holds `seq_len + 1` (inputs and shifted targets)."""
    out: str = "x"
    """The output column (it replaces every input column)."""


class ToTensor(Section):
    """Scalar columns (or the names matching a prefix) into one fixed-size tensor column: the layout that
    trains fastest (one contiguous buffer per batch instead of dozens of columns)."""
    op: Literal["to_tensor"]
    """to_tensor"""
    columns: list[str] = Field(default_factory=list)
    """The scalar columns to stack, in this order (or use `prefix`)."""
    prefix: str | None = None
    """Take every column whose name starts with this, in the schema's order (instead of `columns`)."""
    out: str = "x"
    """The output tensor column; the stacked columns are dropped."""
    dtype: Literal["float32", "float16", "int64", "int32", "uint8"] = "float32"
    """The tensor's element type."""


class Cast(Section):
    """One column to another element type."""
    op: Literal["cast"]
    """cast"""
    column: str
    """The column to cast (in place)."""
    dtype: Literal["float32", "float16", "float64", "int64", "int32", "uint8"]
    """The new element type."""


class UserTransform(Section):
    """Your own `module:function(batch: dict[str, numpy.ndarray]) -> dict[str, numpy.ndarray]`.
    Its module's source is part of the cache fingerprint: editing it prepares the data again."""
    op: Literal["map_batches"]
    """map_batches"""
    fn: str
    """`module:function` taking and returning a dict of numpy columns."""
    kwargs: dict = Field(default_factory=dict)
    """Keyword arguments passed to `fn` after the batch."""

    @field_validator("fn")
    @classmethod
    def _path(cls, v: str) -> str:
        if ":" not in v or not all(v.split(":", 1)):
            raise ValueError(f"`fn` must be a `module:function` import path, got {v!r}")
        return v


Transform = Annotated[Union[Normalize, TokenizeBytes, ToTensor, Cast, UserTransform], Field(discriminator="op")]


class DataConfig(Section):
    train: str
    """Training shards: a folder, a glob of Parquet files, or a URI (`s3://bucket/prefix`)."""
    val: str | None = None
    """Validation shards, same forms as `train`; evaluation is skipped when unset."""
    features: str = "x"
    """The input column (after transforms): a fixed-size list (tensor) column, or a scalar column."""
    label: str | None = "y"
    """The target column for classification; unset for language modeling."""
    s3: S3Config = Field(default_factory=S3Config)
    """Object-store endpoint and credentials for `s3://` paths."""
    transforms: list[Transform] = Field(default_factory=list)
    """Run in order as Ray Data tasks, one per shard, before training; the output is cached (`data.cache`)."""
    cache: CacheConfig = Field(default_factory=CacheConfig)
    """The prepared-data cache (the transforms' output)."""
    shard_cache: ShardCacheConfig = Field(default_factory=ShardCacheConfig)
    """Each node's local copy of shards read from object storage."""
    on_bad_shard: Literal["fail", "skip"] = "fail"
    """A shard that cannot be read or does not match the others: `fail` names it and stops before training;
    `skip` trains without it, and the run lists the skipped shards in MLflow."""
    shuffle_window_shards: int = Field(8, ge=0)
    """Samples are shuffled within windows of this many shards (the shards themselves are shuffled too);
    each worker holds at most two windows in memory. 0: shuffle the whole dataset (it must fit in memory)."""
