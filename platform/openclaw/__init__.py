"""openclaw: elastic, exactly-resumable PyTorch training on Ray, tracked in MLflow.

The SDK (`train`, `sweep`, `load_model`) is imported on first use: every Ray worker imports this package
(its training loop lives in it), and a worker needs neither the driver's code nor MLflow.
"""
import logging

from openclaw.config import Config, load_config
from openclaw.errors import CheckpointError, ConfigError, DataError, OpenClawError, UserError
from openclaw.tracking.redact import ScrubbedLog

logging.getLogger("openclaw").addFilter(ScrubbedLog())  # openclaw's log lines name no credential

__all__ = ["Config", "load_config", "train", "sweep", "load_model", "export", "events",
           "OpenClawError", "UserError", "ConfigError", "DataError", "CheckpointError"]

_SDK = ("train", "sweep", "load_model", "export", "events")


def __getattr__(name: str):
    if name in _SDK:  # heavy (Ray's driver side, MLflow): loaded when the SDK is used, not by workers
        from openclaw import sdk
        return getattr(sdk, name)
    raise AttributeError(f"module 'openclaw' has no attribute {name!r}")
