"""openclaw: elastic, exactly-resumable PyTorch training on Ray, tracked in MLflow."""
from openclaw.config import Config, load_config
from openclaw.errors import CheckpointError, ConfigError, DataError, OpenClawError, UserError
from openclaw.sdk import load_model, sweep, train

__all__ = ["Config", "load_config", "train", "sweep", "load_model",
           "OpenClawError", "UserError", "ConfigError", "DataError", "CheckpointError"]
