"""The one place a `module:function` named in a config is imported (driver, workers and Ray Data tasks).

Config keys that take user code: `model.name`, `task` and `data.transforms[].fn`. Nothing else in
openclaw imports code named by a file.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from openclaw.errors import ConfigError


def import_path(path: str, key: str) -> Callable[..., Any]:
    """Resolve ``module:function``; a failure names the config key."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"`{key}`: cannot import module {module_name!r} ({e}). Check the spelling, and that the "
                          f"module is on PYTHONPATH (or ships with the job's working dir).") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"`{key}`: module {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"`{key}`: {path} is not callable.")
    return obj
