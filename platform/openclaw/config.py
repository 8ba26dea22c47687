"""The typed config tree. One YAML file per job, then ``--set dotted.key=value`` overrides.

Each section documents its keys; validation names the key and what is allowed there. The resolved
config (after defaults and overrides) is what the run saves and logs, so it alone describes a run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from openclaw.data.config import DataConfig
from openclaw.errors import ConfigError
from openclaw.sweep.config import SweepConfig

BUILTIN_MODELS = ("mlp", "gpt")
BUILTIN_TASKS = ("classification", "language_modeling")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def _import_path_or(value: str, builtins: tuple[str, ...], key: str) -> str:
    if value in builtins or (":" in value and all(value.split(":", 1))):
        return value
    raise ValueError(f"`{key}` must be one of {', '.join(builtins)} or a `module:function` import path, got {value!r}")


class ModelConfig(_Section):
    name: str = "mlp"
    """A built-in model (`mlp`, `gpt`) or a `module:function` that returns a `torch.nn.Module`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the model builder."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _import_path_or(v, BUILTIN_MODELS, "model.name")


class OptimizerConfig(_Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (ignored by sgd)."""
    momentum: float = Field(0.9, ge=0)
    """SGD momentum (ignored by Adam)."""


class ScheduleConfig(_Section):
    name: Literal["constant", "cosine", "linear"] = "constant"
    """LR after warmup: constant, cosine decay or linear decay to `min_lr_ratio * lr` at `max_steps`."""
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class TrainConfig(_Section):
    global_batch_size: int = Field(64, gt=0)
    """Samples per optimizer step, whatever the world size: micro_batch_size x accumulation x world_size."""
    micro_batch_size: int = Field(16, gt=0)
    """Samples per forward/backward on one worker."""
    max_steps: int = Field(100, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, else fp32."""
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (0: only at the end). Needs `data.val`."""
    threads_per_worker: int | None = Field(None, gt=0)
    """torch intra-op threads per worker; default: the worker's CPU count. Pinned so restarts reproduce."""
    flush_denormal: bool = True
    """CPU workers flush subnormal floats (below ~1.2e-38) to zero. Late in training, tiny gradients and
    Adam's second moments turn subnormal and every operation on them is slow: the digits MLP's throughput
    fell from 1,750 to 1,230 samples/s over 8,000 steps without it, and held at 1,700+ with it. No effect
    on GPUs."""
    record_samples: bool = False
    """Write the sample positions of every step to `<checkpoint.storage>/<name>/samples/` (JSON lines per
    rank), to audit the data order across restarts and resizes. Local storage only."""
    on_nonfinite_loss: Literal["fail", "skip", "rollback"] = "fail"
    """A NaN/inf loss or gradient: `fail` naming the step; `skip` the batch (counted); or `rollback` to the
    newest valid checkpoint and skip the offending batch on the replay."""


class ScalingConfig(_Section):
    min_workers: int = Field(1, gt=0)
    max_workers: int = Field(1, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    """auto: use GPUs when the cluster has any."""
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    resize_monitor_interval_s: float = Field(10.0, gt=0)
    """Elastic runs (min < max): how often Ray Train looks for resources to grow into."""

    @model_validator(mode="after")
    def _range(self) -> "ScalingConfig":
        if self.min_workers > self.max_workers:
            raise ValueError(f"`scaling.min_workers` ({self.min_workers}) is larger than `scaling.max_workers` "
                             f"({self.max_workers})")
        return self


class ElasticConfig(_Section):
    on_resize: Literal["keep_global_batch", "scale_lr"] = "keep_global_batch"
    """What a change of world size does to the optimization. `keep_global_batch`: the global batch and
    the LR schedule stay as configured and gradient accumulation absorbs the change, so a resized run
    follows the same optimization path. `scale_lr`: each worker keeps the batch it has at
    `scaling.max_workers` (`train.global_batch_size / max_workers`), so the global batch shrinks and
    grows with the world, and the LR is scaled by `lr_rule`."""
    lr_rule: Literal["linear", "sqrt"] = "linear"
    """With `scale_lr`: the LR is multiplied by `world / max_workers` (linear) or its square root (sqrt)."""


class CheckpointConfig(_Section):
    every_steps: int = Field(50, gt=0)
    """Save every N steps, and always at the end."""
    keep: int = Field(3, gt=0)
    """How many checkpoints to keep."""
    storage: str = "runs"
    """A local folder (made absolute) or a URI such as s3://bucket/prefix."""
    async_: bool = Field(False, alias="async")
    """`async: true`: snapshot the state to host memory and write the checkpoint in the background, so
    training stalls only for the snapshot. The final checkpoint and a stop's are always written at once."""


class FailureConfig(_Section):
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts before the run fails; -1 retries forever."""
    worker_start_timeout_s: float = Field(30.0, gt=0)
    """How long Ray Train waits for a worker group to start before it retries at another size
    (Ray's default is 60 s, which it can spend waiting on a node that has died)."""


class TrackingConfig(_Section):
    enabled: bool = True
    """false: no MLflow run (progress lines and checkpoints as usual), e.g. to measure tracking's cost."""
    uri: str | None = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder."""
    experiment: str = "openclaw"
    register_as: str | None = None
    """Register the final model in the MLflow model registry under this name (a new version per run)."""
    parent_run_id: str | None = None
    """Nest this run under that MLflow run (a sweep sets it on its trials)."""
    flush_timeout_s: float = Field(120.0, ge=0)
    """At the end of a run, how long to wait for an unreachable tracking server before the queued
    metrics are written to a local spool file (uploaded later with `openclaw sync-spool FILE`)."""


class Config(_Section):
    name: str = "openclaw-run"
    """The run name, in Ray's storage and in MLflow."""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: str = "classification"
    """`classification`, `language_modeling`, or a `module:function` loss(model, batch) -> (loss_sum, count)."""
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    elastic: ElasticConfig = Field(default_factory=ElasticConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig | None = None
    """Hyperparameter search for `openclaw sweep` (see `sweep_config`); `openclaw train` ignores it."""

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return _import_path_or(v, BUILTIN_TASKS, "task")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.strip() != v:
            raise ValueError(f"`name` must be a non-empty name without '/' or surrounding spaces, got {v!r}")
        return v

    @model_validator(mode="after")
    def _batch_divides(self) -> "Config":
        t, s = self.train, self.scaling
        # scale_lr keeps the per-worker batch of max_workers, so only that world size has to divide.
        worlds = range(s.min_workers, s.max_workers + 1) if self.elastic.on_resize == "keep_global_batch" \
            else [s.max_workers]
        bad = [w for w in worlds if t.global_batch_size % (t.micro_batch_size * w)]
        if bad:
            raise ValueError(
                f"`train.global_batch_size` ({t.global_batch_size}) must be divisible by `train.micro_batch_size` "
                f"({t.micro_batch_size}) x world size for every world size from `scaling.min_workers` to "
                f"`scaling.max_workers`; it is not for world size {', '.join(map(str, bad))}. Change the batch "
                f"sizes (e.g. global_batch_size={_lcm_batch(t.micro_batch_size, s.min_workers, s.max_workers)}) "
                f"or the worker range.")
        return self

    def resolved(self) -> dict[str, Any]:
        """The config as plain data, defaults filled in."""
        return self.model_dump(mode="json", by_alias=True)


def _lcm_batch(micro: int, lo: int, hi: int) -> int:
    from math import lcm
    return micro * lcm(*range(lo, hi + 1))


# ---- loading -----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None,
                *, base: dict[str, Any] | None = None) -> Config:
    """Read a YAML config, apply ``dotted.key=value`` overrides, and validate it into a `Config`."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw = _read_yaml(Path(path))
    for key, value in _parse_overrides(overrides).items():
        set_dotted(raw, key, value)
    return validate(raw, source=str(path) if path else "config")


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, source)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass the path of a YAML file, "
                          f"for example jobs/configs/digits.yaml.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"Config file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}. "
                          f"Fix the syntax there (indentation, a missing ':' or an unclosed quote).") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections (name, model, data, train, ...), "
                          f"not a {type(raw).__name__}.")
    return raw


def _parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} is not of the form dotted.key=value, e.g. --set train.max_steps=200.")
        try:
            parsed[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            parsed[key.strip()] = text
    return parsed


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override {key}: `{'.'.join(parts[:i + 1])}` is a value, not a section.")
        node = child
    node[parts[-1]] = value


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            lines.append(f"unknown key `{key}`; allowed keys there: {', '.join(allowed)}")
        elif err["type"] == "missing":
            lines.append(f"missing required key `{key}`")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            shown = "" if isinstance(given, dict) or "`" in msg else f" (got {given!r})"
            lines.append(f"`{key}`: {msg}{shown}")
    return f"Invalid config in {source}: " + "; ".join(lines) + "."


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)  # X | None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return [f.alias or name for name, f in model.model_fields.items()]


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
