"""Ray Tune's side of a sweep: the search space, the search algorithm and the scheduler (driver; the
scheduler runs in Tune's controller, on the driver)."""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from openclaw.config import Config
from openclaw.runtime.control import ask_to_stop
from openclaw.sweeps.config import SweepConfig
from openclaw.sweeps.trial import trial_name


def tune_space(s: SweepConfig) -> dict[str, Any]:
    if s.search == "grid":
        return {k: tune.grid_search(list(p.choice)) for k, p in s.space.items()}
    make = {"choice": lambda a: tune.choice(list(a)), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {k: make[p.kind](p.args) for k, p in s.space.items()}


def search_alg(s: SweepConfig):
    """Random and grid search: Tune's variant generator, seeded, which limits concurrency itself (Tune
    ignores `max_concurrent_trials` for it); optuna: a `Searcher`, limited by `max_concurrent_trials`."""
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # optional: pip install 'openclaw[optuna]'
        return OptunaSearch(seed=s.seed)
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)


class GracefulASHA(ASHAScheduler):
    """ASHA whose stops are graceful. Tune would kill the trial's actor, which leaves its worker group's
    placement group behind (a CPU per stopped trial, until the job ends) and can cut its last metrics
    off. Instead the trial is asked, through its control plane, to checkpoint at its next step and
    return; it then ends like a finished trial and shuts its workers down. A trial at its last step is
    never stopped: it logs its model."""

    def __init__(self, *, max_steps: int, sweep_name: str, **kwargs):
        super().__init__(time_attr="step", max_t=max_steps, **kwargs)
        self.max_steps, self.sweep_name, self.stopping = max_steps, sweep_name, set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and result.get("step", 0) < self.max_steps and trial.trial_id not in self.stopping:
            self.stopping.add(trial.trial_id)
            ask_to_stop(trial_name(self.sweep_name, trial.trial_id), "stopped early by ASHA")
        return self.CONTINUE


def scheduler(s: SweepConfig, config: Config) -> GracefulASHA | None:
    if s.scheduler != "asha":
        return None
    return GracefulASHA(max_steps=config.train.max_steps, sweep_name=config.name,
                        grace_period=s.asha.grace_period_steps, reduction_factor=s.asha.reduction_factor)
