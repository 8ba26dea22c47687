"""The sweep's checks before anything starts (driver): its config against the training config, each tuned
key against the values its distribution gives, and the combinations of those values against the model's
layout and the data, so that a trial that could not start is found before any does."""
from __future__ import annotations

import importlib.util
import itertools
import math

from openclaw.config import Config
from openclaw.data.sources import Source
from openclaw.errors import ConfigError, DataError
from openclaw.launch.preflight import check_model_layout, check_value_ranges
from openclaw.sweeps.config import SweepConfig, check_against
from openclaw.sweeps.trial import trial_config


def check_sweep(config: Config) -> SweepConfig:
    """Everything about the sweep that can be wrong, found before Ray or MLflow start."""
    s = config.sweep
    if s is None:
        raise ConfigError(f"config {config.name!r} has no `sweep:` section. Add one with `metric`, `mode` and a "
                          f"`space` of dotted keys (see jobs/configs/digits-sweep.yaml), or use `openclaw train`.")
    problems = check_against(s, config.resolved())
    if not config.tracking.enabled:
        problems.append("a sweep records its trials in MLflow: set `tracking.enabled: true`")
    if problems:
        raise ConfigError("Invalid sweep: " + "; ".join(problems) + ".")
    for key, spec in s.space.items():  # each tuned key must exist and accept the values it will get
        for value in _values_to_try(spec):
            try:
                trial = trial_config(config.resolved(), {key: value}, sweep_name=config.name, trial_id="check",
                                     storage="/tmp", tracking_uri="sqlite://", parent_run_id=None)
                if key.startswith("model."):  # a model's own arguments are checked as it is built
                    check_model_layout(trial)
            except ConfigError as e:
                hint = (f" A `{spec.kind}` draws floats: use `randint` (or `choice`) for a key that takes whole "
                        f"numbers." if spec.kind in ("uniform", "loguniform") else "")
                raise ConfigError(f"`sweep.space.{key}` gives {value!r}, which the config refuses: {e}{hint}") from None
    # Combinations of those keys' values (a global batch with a micro-batch that does not divide it), and
    # what the sweep needs of each (an `eval_every` the space sets that no checkpoint step is a multiple of).
    for params, trial in _space_trials(config, s, ("train.", "scaling.", "elastic.", "data.", "task")):
        problems = check_against(s, trial.resolved())
        if problems:
            raise ConfigError(f"`sweep.space` gives {_given(params)}, which the sweep refuses: " + "; ".join(problems)
                              + ".")
    check_layouts(config, s)
    if s.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("`sweep.search: optuna` needs optuna: pip install 'openclaw[optuna]', or use "
                          "`search: random`.")
    return s


MAX_LAYOUT_CHECKS = 256
"""Combinations of the space's model and parallelism values `check_layouts` builds at most (on the meta
device, a few milliseconds each for the built-in models)."""


def _values_to_try(spec) -> list:
    """The values a key's distribution can give that the config may refuse: each `choice`; a `randint`'s
    ends (its high end is exclusive); a float range's ends and a value inside it, with a fraction (a
    range over a key that takes whole numbers draws them)."""
    if spec.kind == "choice":
        return list(spec.choice)
    low, high = spec.args
    if spec.kind == "randint":
        return [low, high - 1]
    inside = low * (high / low) ** 0.37 if spec.kind == "loguniform" else low + 0.37 * (high - low)
    if inside == int(inside):  # ([0, 100] gave 37.0, which an integer key takes)
        inside = math.nextafter(inside, high)
    return [low, inside, high]


def check_layouts(config: Config, s: SweepConfig) -> None:
    """Every combination of the values the space gives the model and parallelism keys (each `choice`,
    each integer of a `randint`; a float range keeps the file's value) against the layout the model must
    take, as preflight checks the file's own: a trial that could not start is found before any does.
    The first `MAX_LAYOUT_CHECKS` combinations, in grid order."""
    for params, trial in _space_trials(config, s, ("model.", "parallelism.")):
        try:
            check_model_layout(trial)
        except ConfigError as e:
            raise ConfigError(f"`sweep.space` gives {_given(params)}, a layout the model cannot take: {e}") from None


def check_value_ranges_in_space(config: Config, s: SweepConfig, sources: dict[str, Source]) -> None:
    """Each combination of the model values the space gives against the data's token ids or labels, as
    preflight checks the file's own (`check_value_ranges`): a vocabulary or a class count the data does not
    fit. With `data.transforms` the prepared data is checked, by the file's own values, once prepared."""
    if config.data.transforms:
        return
    for params, trial in _space_trials(config, s, ("model.",)):
        try:
            check_value_ranges(trial, sources)
        except (ConfigError, DataError) as e:  # a built-in model that cannot run on the rows: a ConfigError
            raise type(e)(f"`sweep.space` gives {_given(params)}, which the data does not fit: {e}") from None


def _space_trials(config: Config, s: SweepConfig, prefixes: tuple[str, ...]):
    """(params, trial config) of each combination of the discrete values the space gives keys under
    `prefixes`, the first `MAX_LAYOUT_CHECKS` in grid order; nothing where it gives none."""
    keys = [k for k, spec in s.space.items() if k.startswith(prefixes) and spec.kind in ("choice", "randint")]
    if not keys:
        return
    values = [s.space[k].choice if s.space[k].kind == "choice" else range(*s.space[k].args) for k in keys]
    base = config.resolved()
    for combo in itertools.islice(itertools.product(*values), MAX_LAYOUT_CHECKS):
        params = dict(zip(keys, combo))
        try:
            trial = trial_config(base, params, sweep_name=config.name, trial_id="check", storage="/tmp",
                                 tracking_uri="sqlite://", parent_run_id=None)
        except ConfigError as e:
            raise ConfigError(f"`sweep.space` gives {_given(params)}, which the config refuses: {e}") from None
        yield params, trial


def _given(params: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


# ---- the sweep ----------------------------------------------------------------------------------
