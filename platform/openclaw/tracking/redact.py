"""What may be written where others can read it: secret-looking config values masked (driver, workers,
tracking actor). Params, `config.yaml` and every other copy of the config written by openclaw go
through `redacted`."""
from __future__ import annotations

from typing import Any

SECRET_WORDS = ("token", "password", "passwd", "secret", "credential", "key")
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """A key that looks like it holds a secret: its last segment names a token, password, secret or key
    (`api_key`, `aws_secret_access_key`, `hf_token`, `key`), split on `.`, `_` and `-`."""
    words = key.rsplit(".", 1)[-1].lower().replace("-", "_").split("_")
    return any(w in SECRET_WORDS or w.endswith(("token", "password", "secret")) or w.startswith("credential")
               for w in words)


def redacted(tree: Any) -> Any:
    """The tree with every secret-looking key's value replaced: what may be logged (params, config.yaml)."""
    if isinstance(tree, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v is not None else redacted(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redacted(v) for v in tree]
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the MLflow params view of a config."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
