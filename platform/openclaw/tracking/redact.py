"""What may be written where others can read it (driver, workers, tracking actor): secret-looking
config values masked (`redacted`: params, `config.yaml`, checkpoints' `config.json`, the spool, the
sweep's saved state), URIs without user info (`public_uri`: what is printed and stored), and messages
with credentials masked (`scrub`: errors and warnings openclaw prints)."""
from __future__ import annotations

import logging
import re
from typing import Any

from openclaw.constants import is_password_key, is_secret_key, secret_env

REDACTED = "***"


def redacted(tree: Any) -> Any:
    """The tree with every secret-looking key's value replaced, and every URI without its user info (a
    `tracking.uri` of `postgresql://user:pw@db/mlflow`): what may be logged (params, config.yaml)."""
    if isinstance(tree, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and _maskable(str(k), v) else redacted(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redacted(v) for v in tree]
    if isinstance(tree, str):
        return public_uri(tree)
    return tree


def _maskable(key: str, value: Any) -> bool:
    """A secret-looking key's value to mask: anything but nothing; under a password's name, whatever it is
    (`password: 123456`); under a key's or a token's, not a number (a model's `n_token: 256` is a size,
    and rebuilds the model from its checkpoint) nor a tokenizer's special token (`pad_token: "<pad>"`)."""
    if value is None:
        return False
    if is_password_key(key):
        return True
    special = isinstance(value, str) and _SPECIAL_TOKEN.fullmatch(value)  # (not a list: `[sk-abc]` is one)
    return isinstance(value, bool) or not (isinstance(value, (int, float)) or special)


_SPECIAL_TOKEN = re.compile(r"<[^<>\s]{1,30}>|\[[^\[\]\s]{1,30}\]")
"""A tokenizer's special token (`<pad>`, `</s>`, `<|endoftext|>`, `[PAD]`): short, bracketed, no spaces."""


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


def public_uri(uri: str | None) -> str | None:
    """A URI without its user info (`http://user:pass@host` -> `http://host`): what may be printed or stored.
    A database URI's password ends at its last `@`, as SQLAlchemy (MLflow's database stores) reads it, `/`
    included (generated passwords hold them); a URL's user info ends its netloc, at the first `/`."""
    if not uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    info = _DATABASE_USERINFO.match(rest) if scheme.lower().split("+")[0] in _DATABASES else None
    if info:
        return f"{scheme}://{rest[info.end():]}"
    netloc, sep, path = rest.partition("/")
    if "@" not in netloc:
        return uri
    return f"{scheme}://{netloc.rsplit('@', 1)[1]}{sep}{path}"


_DATABASES = ("postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle", "cockroachdb")
"""URI schemes SQLAlchemy's databases take (with a `+driver`); sqlite's holds a path, no user info."""

_DATABASE_USERINFO = re.compile(r"[^:/@?\s]*(?::[^?\s]*)?@")
"""A database URI's user info, as SQLAlchemy parses it: a user (no `:` or `/`), then a password up to the
last `@` before the query."""

_USERINFO = re.compile(r"://[^/\s]*@")
"""A URL's user info: everything of its netloc up to the last `@` (a password may hold one; a token may
stand alone, `https://TOKEN@host`)."""

_DATABASE_URI = re.compile(r"\b((?:%s)(?:\+\w+)?://)%s" % ("|".join(_DATABASES), _DATABASE_USERINFO.pattern))
"""A database URI's scheme and user info, in free text."""


def scrub(text: str) -> str:
    """`text` (an error message, a log line) with credentials masked: the user info of any URL, and the
    value of every credential in this process's environment (`constants.SECRET_ENV_VARS`)."""
    text = _USERINFO.sub("://***@", _DATABASE_URI.sub(r"\1***@", str(text)))
    for value in secret_env().values():
        if len(value) >= 4:
            text = text.replace(value, REDACTED)
    return text


class ScrubbedLog(logging.Filter):
    """Masks credentials (`scrub`) in every record of the logger it is put on (`openclaw`'s, as the
    package loads, in every process): a warning that logs an exception as MLflow's or boto's client wrote
    it names the URL whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.msg, record.args = scrub(record.getMessage()), ()
        except (TypeError, ValueError):  # arguments its format does not take: the handler says so, as without
            pass
        return True
