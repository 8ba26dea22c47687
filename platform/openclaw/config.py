"""The typed config tree (foundation: pydantic and yaml only). One YAML file per job, then
``--set dotted.key=value`` overrides.

Each component declares its own section next to it; this module composes them and loads them:

    name, seed          here
    model, train        engine/config.py
    parallelism         engine/parallel/config.py
    task                here (a built-in task or a `module:function` loss)
    data                data/config.py
    scaling, failure    launch/config.py
    elastic, checkpoint runtime/config.py
    tracking            tracking/config.py
    sweep               sweeps/config.py
    profile             profiling/config.py

Validation names the key and what is allowed there. The resolved config (after defaults and
overrides) is what the run saves and logs, so it alone describes a run.
"""
from __future__ import annotations

import copy
import os
import re
from math import lcm
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from openclaw.config_files import parse_overrides, read_yaml, set_dotted
from openclaw.config_tree import booleans_for_numbers, by_override, explain, is_section
from openclaw.data.config import DataConfig
from openclaw.engine.config import ModelConfig, OptimizerConfig, ScheduleConfig, TrainConfig  # noqa: F401
from openclaw.engine.parallel.config import ParallelismConfig, common_sizes
from openclaw.errors import ConfigError
from openclaw.launch.config import FailureConfig, ScalingConfig
from openclaw.profiling.config import ProfileConfig
from openclaw.runtime.config import CheckpointConfig, ElasticConfig
from openclaw.section import Section, import_path_or
from openclaw.sweeps.config import SweepConfig
from openclaw.tracking.config import TrackingConfig

BUILTIN_TASKS = ("classification", "language_modeling")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
FP8_ON_CPU = ("`train.precision: fp8` needs GPU workers of compute capability 8.9+ (float8 tensor cores); these "
              "workers have no GPU (`scaling.use_gpu`). Use `train.precision: auto` (fp32 on CPUs) or run on GPUs.")
RESERVED_NAMES = frozenset({"trials", "samples", "data-cache", "spool"})
"""Folder names openclaw itself uses inside storage and run folders."""


class Config(Section):
    name: str = "openclaw-run"
    """The run name, in Ray's storage and in MLflow. The same name (and `checkpoint.storage`) resumes."""
    seed: int = Field(0, ge=0)
    """Seeds the initial weights, the sample order and every step's RNG (dropout): the same seed trains
    the same model, whatever the world size and however often the run restarts."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model to train."""
    task: str = "classification"
    """`classification`, `language_modeling`, or a `module:function` loss(model, batch) -> (loss_sum, count)."""
    data: DataConfig
    """The datasets: where they are, their columns, transforms and caches."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Batch sizes, steps, optimizer, schedule, precision and the training loop's cadence."""
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    """How the model is spread over the workers: DDP, FSDP (and HSDP), tensor and pipeline parallelism."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """How many workers, and the resources of each."""
    elastic: ElasticConfig = Field(default_factory=ElasticConfig)
    """What a change of world size does to the optimization."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """When, where and how checkpoints are written."""
    failure: FailureConfig = Field(default_factory=FailureConfig)
    """How many worker-group restarts a run survives, and how long a start may take."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """The MLflow run: server, experiment, registry."""
    sweep: SweepConfig | None = None
    """Hyperparameter search for `openclaw sweep` (see `sweeps/config.py`); `openclaw train` ignores it."""
    profile: ProfileConfig | None = None
    """Profile a few steps with `torch.profiler` and log the traces and an HTML report under `profile/`
    (see `profiling/config.py`); null (the default): no profiler, no cost."""

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return import_path_or(v, BUILTIN_TASKS, "task")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.fullmatch(v) or v.lower() in RESERVED_NAMES or v.startswith("checkpoint_"):
            raise ValueError(f"`name` must start with a letter or digit and hold only letters, digits, '.', '_' and '-' "
                             f"(it names a folder in `checkpoint.storage` and an MLflow run), and not be one of the "
                             f"folder names openclaw uses ({', '.join(sorted(RESERVED_NAMES))}, checkpoint_*); got {v!r}")
        return v

    @model_validator(mode="after")
    def _fp8_needs_gpus(self) -> "Config":
        if self.train.precision == "fp8" and self.scaling.use_gpu is False:
            raise ValueError(FP8_ON_CPU)
        return self

    @model_validator(mode="after")
    def _label_is_another_column(self) -> "Config":
        if self.data.label is not None and self.data.label == self.data.features:
            raise ValueError(f"`data.label` names the same column as `data.features` ({self.data.label!r}). "
                             + ("Language modeling takes its targets from the features (each row's tokens shifted "
                                "by one): set `data.label: null`." if self.task == "language_modeling" else
                                "Set it to the column that holds the targets."))
        return self

    @model_validator(mode="after")
    def _worlds_lay_out(self) -> "Config":
        """The worker range's ends must lay out as replicate x tensor x pipeline x shard; an elastic run
        takes only the multiples of that unit between them (`ParallelismConfig.worlds`)."""
        p, s, unit = self.parallelism, self.scaling, self.parallelism.world_unit
        bad = [w for w in (s.min_workers, s.max_workers) if w % unit]
        if bad:
            raise ValueError(
                f"`scaling.min_workers` ({s.min_workers}) and `scaling.max_workers` ({s.max_workers}) must be "
                f"multiples of `parallelism.replicate` ({p.replicate}) x `parallelism.tensor` ({p.tensor}) x "
                f"`parallelism.pipeline` ({p.pipeline}) = {unit}: {bad[0]} is not. An elastic run takes the "
                f"multiples of {unit} between them. Change those keys or the worker range.")
        return self

    def notes(self) -> list[str]:
        """Settings that work against each other without failing the run, each as a sentence to print
        before it starts (with `parallelism.unused_settings`)."""
        t, d, out = self.train, self.data, []
        if t.schedule.warmup_steps >= t.max_steps:
            out.append(f"`train.schedule.warmup_steps` ({t.schedule.warmup_steps}) is not below `train.max_steps` "
                       f"({t.max_steps}): the LR never reaches `train.optimizer.lr`"
                       + ("." if t.schedule.name == "constant" else f", and its {t.schedule.name} decay never starts."))
        if d.val is not None and d.val == d.train:
            out.append("`data.val` is `data.train`: the validation loss is measured on the training data.")
        if d.val is None and (t.eval_every or t.eval_rows):
            out.append("`train.eval_every` and `train.eval_rows` need `data.val`, which is not set: this run does "
                       "not evaluate.")
        return out

    @property
    def worlds(self) -> list[int]:
        """Every world size the run may take (an elastic run's: whole layouts from min to max workers)."""
        return self.parallelism.worlds(self.scaling.min_workers, self.scaling.max_workers)

    @model_validator(mode="after")
    def _batch_divides(self) -> "Config":
        t, s, mp = self.train, self.scaling, self.parallelism.model_parallel
        # The data-parallel degree is the world over tensor x pipeline. scale_lr keeps the per-worker batch
        # of max_workers, so only that world size has to divide.
        worlds = self.worlds if self.elastic.on_resize == "keep_global_batch" else [s.max_workers]
        micro = 1 if t.micro_batch_size == "auto" else t.micro_batch_size  # auto picks a divisor on the workers
        bad = [w for w in worlds if t.global_batch_size % (micro * (w // mp))]
        if bad:
            per = "data-parallel degree (world size / (tensor x pipeline))" if mp > 1 else "world size"
            raise ValueError(
                f"`train.global_batch_size` ({t.global_batch_size}) must be divisible by `train.micro_batch_size` "
                f"({t.micro_batch_size}) x {per} for every world size from `scaling.min_workers` to "
                f"`scaling.max_workers`; it is not for world size {', '.join(map(str, bad))}. Change the batch "
                f"sizes (e.g. global_batch_size="
                f"{micro * lcm(*(w // mp for w in self.worlds))}) or the "
                f"worker range.")
        mb = self.parallelism.microbatches
        if isinstance(mb, int):
            uneven = [w for w in worlds if (t.global_batch_size // (w // mp)) % mb]
            if uneven:
                raise ValueError(f"`parallelism.microbatches` ({mb}) must divide each data-parallel rank's share of "
                                 f"`train.global_batch_size` ({t.global_batch_size}); it does not at world size "
                                 f"{', '.join(map(str, uneven))}. Use `auto` or a divisor.")
        self._schedule_takes_its_microbatches(sorted({t.global_batch_size // (w // mp) for w in worlds}))
        return self

    def _schedule_takes_its_microbatches(self, shares: list[int]) -> None:
        """The pipeline schedule takes the micro-batches each data-parallel rank's share splits into. Where
        the workers pick the micro-batch (`auto` both), one size that it takes must exist."""
        p, micro = self.parallelism, self.train.micro_batch_size
        counts = {share: p.microbatches_per_step(share, micro) for share in shares}
        if micro == "auto" and p.microbatches == "auto":
            if common_sizes(shares, p.count_suits):
                return
            counts = {share: share for share in shares}  # micro-batches of 1 sample: as many as there can be
        for share, n in counts.items():
            why = None if n is None else p.schedule_refuses(n)
            if why:
                fits = [d for d in common_sizes(shares) if not p.schedule_refuses(d)]
                fix = f"`parallelism.microbatches: {fits[0]}`, " if fits else ""
                raise ValueError(f"`parallelism.pipeline_schedule: {p.pipeline_schedule}`: {why} (a data-parallel "
                                 f"rank's {share} samples as `parallelism.microbatches: {p.microbatches}` splits "
                                 f"them). Set {fix}a smaller `train.micro_batch_size` (or a larger "
                                 f"`train.global_batch_size`), or `parallelism.pipeline_schedule: gpipe`.")

    @model_validator(mode="after")
    def _profile_fits(self) -> "Config":
        if self.profile is not None:
            self.profile.check_fits(self.train.max_steps, self.scaling.max_workers)
        return self

    @model_validator(mode="after")
    def _prepared_data_has_a_folder(self) -> "Config":
        """The prepared-data cache is a folder (locks, renames): by default it lives in `checkpoint.storage`,
        which an object store cannot hold it in."""
        d, storage = self.data, self.checkpoint.storage
        if (d.transforms or d.on_bad_shard == "skip") and not d.cache.dir and "://" in storage:
            why = "`data.transforms`" if d.transforms else "`data.on_bad_shard: skip`"
            raise ValueError(
                f"`data.cache.dir` is unset, and its default, `<checkpoint.storage>/.data-cache`, cannot be used: "
                f"`checkpoint.storage` is the URI {storage}, and the prepared-data cache that {why} needs is a "
                f"folder. Set `data.cache.dir` to a local folder (one node) or to a folder every node sees (a "
                f"shared mount), e.g. `--set data.cache.dir=/mnt/shared/openclaw-data-cache`")
        return self

    def resolved(self) -> dict[str, Any]:
        """The config as plain data, defaults filled in."""
        return self.model_dump(mode="json", by_alias=True)


# ---- loading -----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None,
                *, base: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or start from a copy of `base`), apply ``dotted.key=value`` overrides, and
    validate it into a `Config`."""
    if path is not None and base is not None:
        raise ConfigError("load_config takes a config file or a `base` to start from, not both.")
    raw: dict[str, Any] = read_yaml(Path(path)) if path is not None else copy.deepcopy(base or {})
    parsed = parse_overrides(overrides)
    for key, value in parsed:  # a mapping given for a section merges into it; for a value, replaces it
        set_dotted(raw, key, value, merge=is_section(Config, key.split(".")))
    return validate(raw, source=str(path) if path else "config", overridden=tuple(k for k, _ in parsed))


def with_overrides(config: Config, overrides: list[str] | dict[str, Any] | None) -> Config:
    """A loaded config with `overrides` applied, validated again as a whole: a section's field set on the
    loaded object (`cfg.train.precision = "fp8"`) is checked alone, not against the other sections."""
    return load_config(None, overrides, base=config.resolved())


def validate(raw: dict[str, Any], source: str = "config", overridden: tuple[str, ...] = ()) -> Config:
    """`overridden`: the dotted keys an override set, so that an error there says it came from one."""
    booleans = [f"`{key}` must be a number, not a boolean (YAML reads true/false/yes/no/on/off as booleans)"
                + by_override(key, overridden)
                for key in booleans_for_numbers(raw, Config)]
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:  # every problem at once, the booleans' with the rest
        said = explain(e, Config, source, overridden).removeprefix(f"Invalid config in {source}: ").rstrip(".")
        raise ConfigError(f"Invalid config in {source}: " + "; ".join([*booleans, said]) + ".") from None
    if booleans:
        raise ConfigError(f"Invalid config in {source}: " + "; ".join(booleans) + ".")
    return config
