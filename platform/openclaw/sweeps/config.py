"""The `sweep:` config section: what to tune, how to search, when to stop trials early.

    sweep:
      metric: val/loss          # reported with every checkpoint
      mode: min
      num_samples: 8            # trials (with `search: grid`: repeats of the whole grid)
      max_concurrent: 2
      search: random            # random | grid | optuna (pip install 'openclaw[optuna]')
      scheduler: asha           # none | asha
      space:
        train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.kwargs.hidden: {choice: [64, 128, 256]}

Each trial is a whole openclaw run of the rest of the file, with the sampled keys set. Pure: no Ray.

An LR x batch-size sweep scales each trial's LR with its global batch (`lr_scaling`): the swept LR is
the LR at `reference_batch`, and a trial of global batch B trains at lr x rule(B / reference_batch).
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from openclaw.section import Section

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


class ParamSpec(Section):
    """One tuned key: exactly one of these."""
    choice: list[Any] | None = None
    """Pick one of these values (with `search: grid`, try each)."""
    uniform: tuple[float, float] | None = None
    """A float drawn uniformly from [low, high]."""
    loguniform: tuple[float, float] | None = None
    """A float drawn uniformly in log space from [low, high] (both > 0): learning rates, weight decay."""
    randint: tuple[int, int] | None = None
    """An integer from [low, high) (high excluded)."""

    @model_validator(mode="after")
    def _one(self) -> "ParamSpec":
        given = [d for d in DISTRIBUTIONS if getattr(self, d) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}; "
                             f"got {', '.join(given) or 'none'}")
        kind, value = given[0], getattr(self, given[0])
        if kind == "choice" and not value:
            raise ValueError("`choice` needs at least one value")
        if kind != "choice" and not all(math.isfinite(v) for v in value):  # (Tune refused them once started)
            raise ValueError(f"`{kind}` needs finite bounds, got {list(value)}")
        if kind != "choice" and not value[0] < value[1]:
            raise ValueError(f"`{kind}` needs [low, high] with low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"`loguniform` needs a low bound > 0, got {value[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(d for d in DISTRIBUTIONS if getattr(self, d) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)


class AshaConfig(Section):
    grace_period_steps: int = Field(100, gt=0)
    """No trial is stopped before this many steps. Trials report at checkpoints, so make it a multiple
    of `checkpoint.every_steps`."""
    reduction_factor: float = Field(2.0, gt=1)
    """At each rung, keep the best 1/reduction_factor of the trials."""


class LrScalingConfig(Section):
    reference_batch: int = Field(gt=0)
    """The global batch at which the (swept) `train.optimizer.lr` is the LR itself."""
    rule: Literal["elastic", "linear", "sqrt"] = "elastic"
    """How the LR follows the batch: x B/reference_batch (`linear`), x its square root (`sqrt`), or
    `elastic`: the rule the run's `elastic.lr_rule` names (what an elastic `scale_lr` resize applies)."""


class SweepConfig(Section):
    metric: str = "val/loss"
    """The metric to optimize: one reported with every checkpoint (`train/loss`, or `val/...` when every
    checkpoint step is an evaluation step)."""
    mode: Literal["min", "max"] = "min"
    """Whether the best trial has the lowest (`min`) or highest (`max`) metric."""
    num_samples: int = Field(8, gt=0)
    """How many trials; with `search: grid`, how many times the whole grid is run."""
    max_concurrent: int = Field(2, gt=0)
    """Trials running at once."""
    search: Literal["random", "grid", "optuna"] = "random"
    """`random` samples the space, `grid` tries every combination of `choice` values, `optuna` searches
    with Optuna's TPE (pip install 'openclaw[optuna]')."""
    scheduler: Literal["none", "asha"] = "none"
    """`asha`: stop trials whose metric trails the others' at the same step (asynchronous successive halving)."""
    asha: AshaConfig = Field(default_factory=AshaConfig)
    """ASHA's settings, with `scheduler: asha`."""
    seed: int = 0
    """The search's seed: the same seed samples the same trials."""
    space: dict[str, ParamSpec]
    """Dotted config keys, each mapped to a distribution."""
    lr_scaling: LrScalingConfig | None = None
    """With `train.global_batch_size` in the `space`: each trial's LR is scaled to its batch, so the swept
    `train.optimizer.lr` is the LR at `reference_batch`. The parent run then gets a heat-map of the final
    metric over batch x LR (`lr_batch.png`), with the trials' gradient noise scale."""

    @model_validator(mode="after")
    def _space(self) -> "SweepConfig":
        if not self.space:
            raise ValueError("`sweep.space` is empty: map at least one dotted config key to a distribution, "
                             "e.g. train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}")
        bad = [k for k in self.space if k.split(".")[0] in ("name", "sweep", "checkpoint", "tracking")]
        if bad:
            raise ValueError(f"`sweep.space` cannot tune {', '.join(bad)}: the sweep sets each trial's name, "
                             f"checkpoints and tracking itself (`name`, `sweep.*`, `checkpoint.*` and `tracking.*` "
                             f"are the sweep's)")
        if any(k == "train.max_steps" or "train.max_steps".startswith(k + ".") for k in self.space):
            raise ValueError("`sweep.space` cannot tune train.max_steps: the sweep counts every trial against one "
                             "(the scheduler's budget, and whether a trial finished or was stopped early). Set "
                             "`train.max_steps` once, and let `sweep.scheduler: asha` stop the trials that lag")
        if self.lr_scaling and "train.global_batch_size" not in self.space:
            raise ValueError("`sweep.lr_scaling` scales each trial's LR to its global batch: add "
                             "`train.global_batch_size` to `sweep.space` (e.g. {choice: [16, 64, 256]}), or drop "
                             "`sweep.lr_scaling`")
        if self.search == "grid":
            not_choice = [k for k, p in self.space.items() if p.kind != "choice"]
            if not_choice:
                raise ValueError(f"`sweep.search: grid` tries every combination of `choice` values; "
                                 f"{', '.join(not_choice)} {'is' if len(not_choice) == 1 else 'are'} not a choice. "
                                 f"Use `search: random` (or optuna) for continuous ranges")
        return self


def grid_size(sweep: SweepConfig) -> int:
    """Trials a grid search runs: every combination of the choices, `num_samples` times."""
    n = sweep.num_samples
    for p in sweep.space.values():
        n *= len(p.choice or [])
    return n


def trial_lr(raw: dict[str, Any], scaling: dict[str, Any]) -> float:
    """The LR a trial trains at (`raw`: its resolved config, plain data; `scaling`: `sweep.lr_scaling`)."""
    rule = raw["elastic"]["lr_rule"] if scaling["rule"] == "elastic" else scaling["rule"]
    ratio = raw["train"]["global_batch_size"] / scaling["reference_batch"]
    return raw["train"]["optimizer"]["lr"] * {"linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


TRAIN_METRICS = ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/epoch",
                 "train/global_batch_size", "train/skipped_batches", "train/overflow_steps", "train/grad_noise_scale",
                 "train/grad_noise_scale_smooth")
"""The train/ metrics a run logs (`runtime.log_window`, `engine.noise`): what a sweep may tune on."""


def check_against(sweep: SweepConfig, train_cfg: dict[str, Any]) -> list[str]:
    """Problems that only show with the training config: what the sweep's metric and scheduler need.
    `train_cfg` is the resolved config (plain data). Returns messages; empty when all is well."""
    problems = []
    every = train_cfg["checkpoint"]["every_steps"]
    max_steps, eval_every = train_cfg["train"]["max_steps"], train_cfg["train"]["eval_every"]
    if sweep.metric.startswith("val/"):
        known = ("val/loss", "val/accuracy") if train_cfg["task"] == "classification" else ("val/loss",)
        if sweep.metric not in known:
            problems.append(f"`sweep.metric` is {sweep.metric}, which no trial reports: its evaluations report "
                            f"{' and '.join(known)}")
        elif sweep.metric == "val/accuracy" and sweep.mode == "min":
            problems.append("`sweep.metric` is val/accuracy with `sweep.mode: min`: the best trial would be the "
                            "least accurate; set `sweep.mode: max`")
        if not train_cfg["data"].get("val"):
            problems.append(f"`sweep.metric` is {sweep.metric} but `data.val` is not set: set it, or tune "
                            f"`train/loss`")
        elif eval_every == 0 or every % eval_every:
            problems.append(f"`sweep.metric` is {sweep.metric}, which trials report with each checkpoint, so "
                            f"every checkpoint step must be an evaluation step: set `train.eval_every` to a "
                            f"divisor of `checkpoint.every_steps` ({every}), e.g. {every}")
    elif not sweep.metric.startswith("train/"):
        problems.append(f"`sweep.metric` must be a `train/...` or `val/...` metric, got {sweep.metric!r}")
    elif sweep.metric not in TRAIN_METRICS:
        problems.append(f"`sweep.metric` is {sweep.metric}, which no trial reports: the train/ metrics are "
                        f"{', '.join(TRAIN_METRICS)}")
    elif every % train_cfg["train"]["log_every"]:
        problems.append(f"`sweep.metric` is {sweep.metric}, which trials report with each checkpoint, so every "
                        f"checkpoint step must be a logging step: set `train.log_every` to a divisor of "
                        f"`checkpoint.every_steps` ({every})")
    if sweep.scheduler == "asha":
        if sweep.asha.grace_period_steps >= max_steps:
            problems.append(f"`sweep.asha.grace_period_steps` ({sweep.asha.grace_period_steps}) must be below "
                            f"`train.max_steps` ({max_steps}), or no trial can be stopped early")
        elif sweep.asha.grace_period_steps % every:
            problems.append(f"`sweep.asha.grace_period_steps` ({sweep.asha.grace_period_steps}) should be a "
                            f"multiple of `checkpoint.every_steps` ({every}): trials report at checkpoints")
    return problems
