"""A config's YAML file and its ``dotted.key=value`` overrides, as plain dicts before validation
(foundation: yaml only; driver, and each Tune trial for its own overrides). `openclaw.config` validates
what they build."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from openclaw.errors import ConfigError


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _NoDuplicateKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (the plain loader keeps the last
    silently: two `max_steps` under `train`, the first of them ignored). A merge key (`<<: *defaults`)
    is YAML's, expanded by the loader; a key it brings in may be set again beside it."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(
                    None, None, f"key {key!r} is written twice in one mapping (lines {seen[key]} and "
                                f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass the path of a YAML file, "
                          f"for example jobs/configs/digits.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"Config file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8 YAML.") from None
    except OSError as e:
        raise ConfigError(f"Config file {path} cannot be read: {e.strerror or e}.") from None
    try:
        raw = yaml.load(text, Loader=_NoDuplicateKeys)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        fix = "" if isinstance(e, _DuplicateKey) else " Fix the syntax there (indentation, a missing ':' or an unclosed quote)."
        raise ConfigError(f"Config file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}.{fix}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections (name, model, data, train, ...), "
                          f"not a {type(raw).__name__}.")
    return raw


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> list[tuple[str, Any]]:
    """(dotted key, value) in the order given: a key given twice is set twice, the later last."""
    if not overrides:
        return []
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'dotted.key=value' strings or a dict, not one string: "
                          f"pass [{overrides!r}].")
    if isinstance(overrides, dict):
        return list(overrides.items())
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} is not of the form dotted.key=value, e.g. --set train.max_steps=200.")
        try:
            parsed.append((key.strip(), yaml.safe_load(text) if text.strip() else None))
        except yaml.YAMLError:
            parsed.append((key.strip(), text))
    return parsed


KEYED_BY_DOTTED_NAMES = ("sweep.space",)
"""Mappings whose keys are dotted config keys: an override below one names one of its keys whole."""


def set_dotted(raw: dict[str, Any], key: str, value: Any, merge: bool = False) -> None:
    """Set `key` (dotted) in `raw`. A mapping keyed by dotted names (`KEYED_BY_DOTTED_NAMES`) takes the
    rest of the key whole: `sweep.space.train.optimizer.lr` sets its `train.optimizer.lr`. `merge` (the key
    is a config section): a mapping merges into it (`train={log_every: 5}` keeps the section's other keys)."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override {key}: `{'.'.join(parts[:i + 1])}` is a value, not a section.")
        node = child
        if ".".join(parts[:i + 1]) in KEYED_BY_DOTTED_NAMES:
            node[".".join(parts[i + 1:])] = value
            return
    node[parts[-1]] = _merged(node.get(parts[-1]), value) if merge else value


def _merged(old: Any, new: Any) -> Any:
    """`new` over `old`: mappings key by key, anything else replaced."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}
