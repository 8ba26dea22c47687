"""The base of every config section (foundation: pydantic only).

Each component declares its own section next to it (`engine/config.py`, `data/config.py`, ...), and
`openclaw.config` composes them into one tree. A field's docstring is its description: it shows in
`openclaw config --schema` and `--defaults`, and in editors that read the schema.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              use_attribute_docstrings=True)


def import_path_or(value: str, builtins: tuple[str, ...], key: str) -> str:
    """Validate a key that takes a built-in name or a `module:function` import path."""
    if value in builtins or (":" in value and all(value.split(":", 1))):
        return value
    raise ValueError(f"`{key}` must be one of {', '.join(builtins)} or a `module:function` import path, got {value!r}")
