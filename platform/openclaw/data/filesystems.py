"""pyarrow filesystems for dataset specs (a local path, or a URI with its object-store settings) and for
checkpoint storage (driver, workers and Ray Data tasks).

Credentials come from `data.s3` or the standard AWS environment variables; they are passed to pyarrow
and never printed or logged.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def filesystem_for(spec: str, s3: Any = None) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path within it)` for a folder, glob, file or URI. `s3` is a `data.s3` section (or its
    dict) used for `s3://` URIs."""
    if spec.startswith("s3://"):
        parsed = urlparse(spec)
        return s3_filesystem(s3), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if "://" in spec:
        return pafs.FileSystem.from_uri(spec)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))


def s3_filesystem(s3: Any = None) -> pafs.S3FileSystem:
    cfg = s3.model_dump() if hasattr(s3, "model_dump") else dict(s3 or {})
    endpoint = cfg.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": cfg.get("region") or os.environ.get("AWS_DEFAULT_REGION")
                              or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
    if cfg.get("access_key_id"):
        kwargs.update(access_key=cfg["access_key_id"], secret_key=cfg.get("secret_access_key"),
                      session_token=cfg.get("session_token"))
    return pafs.S3FileSystem(**kwargs)


def storage_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path within it)` of checkpoint storage: a local folder or a URI (s3://, gs://, ...),
    whose endpoint and credentials come from the standard environment (`AWS_ENDPOINT_URL`,
    `AWS_ACCESS_KEY_ID`, ...; not `data.s3`, which is the data's).

    An S3 filesystem names them explicitly, so that it keeps them when pickled: Ray Train carries the
    checkpoints' filesystems to its controller (which deletes the old ones), whose environment may have
    neither; `from_uri` alone resolves them at connection time, in the process that connects."""
    if "://" not in path:
        return pafs.LocalFileSystem(), path
    fs, root = pafs.FileSystem.from_uri(path)
    return (_portable(fs) if isinstance(fs, pafs.S3FileSystem) else fs), root


def storage_exists(path: str) -> bool:
    """Whether a file or folder of checkpoint storage (a local path or a URI) is there."""
    fs, root = storage_filesystem(path)
    return fs.get_file_info(root).type != pafs.FileType.NotFound


def _portable(fs: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """`fs` (with the options its URI gave) naming the endpoint and the credentials of this process's
    environment, where the URI named none."""
    rebuild, (options,) = fs.__reduce__()  # the filesystem's own options, as it pickles them
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not options.get("endpoint_override"):
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=url.netloc, scheme=url.scheme)
    own_keys = options.get("access_key") or options.get("anonymous") or options.get("role_arn")
    if os.environ.get("AWS_ACCESS_KEY_ID") and not own_keys:
        options.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                       session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return rebuild(options)


def ray_storage(storage: str) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's `(storage_path, storage_filesystem)` for checkpoint storage (driver). For a URI, the
    filesystem travels to Ray's controller pickled, as an argument (see `storage_filesystem`)."""
    if "://" not in storage:
        return storage, None
    fs, root = storage_filesystem(storage)
    return root, fs


def storage_uri(storage: str, path: str | None) -> str | None:
    """A path within checkpoint storage's filesystem (`storage_filesystem`), as a URI again."""
    if not path or "://" not in storage or "://" in path:
        return path
    return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}"


@contextlib.contextmanager
def local_copy(folder: str) -> Iterator[str]:
    """A local folder with the files of `folder`: the folder itself when it is local, else a temporary
    copy (removed afterwards)."""
    if "://" not in folder:
        yield folder
        return
    fs, root = storage_filesystem(folder)
    with tempfile.TemporaryDirectory(prefix="openclaw-copy-") as d:
        pafs.copy_files(root, d, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield d
