"""A run's advice, read from MLflow or from its final metrics (driver: the end of every run, and
`openclaw advise RUN_ID` for any run logged before).

From MLflow: the run's metric history (its log windows), its logged config (`config.yaml`), the
`resolved/precision` params, its attempt and precision events and its data lineage. Without tracking:
the final metrics Ray Train returns (the last window). The driver prints the recommendations and logs
them on the run as `advice.md` and `advice.json`; nothing here may fail a run that trained.
"""
from __future__ import annotations

import logging
import tempfile
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from openclaw.advice.facts import RANK_KEY, WINDOW_KEYS, RunNotes, facts_from_history, facts_from_metrics
from openclaw.advice.measured import Facts, Recommendation
from openclaw.advice.render import as_json, console, markdown
from openclaw.advice.rules import advise
from openclaw.config import Config, validate
from openclaw.errors import ConfigError
from openclaw.tracking.redact import scrub
from openclaw.tracking.run import metric_histories, sweep_parent, unreadable
from openclaw.tracking.writer import ATTEMPT_EVENTS, no_progress_bars, read_events

log = logging.getLogger("openclaw")
ADVICE_MD, ADVICE_JSON = "advice.md", "advice.json"


def advise_logged_run(run_id: str, tracking_uri: str) -> tuple[list[Recommendation], Facts, str]:
    """(recommendations, facts, where they come from) of an MLflow run (`openclaw advise`)."""
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise unreadable(e, f"MLflow run {run_id!r}", tracking_uri, models_too=False) from None
    if parent := sweep_parent(run, "advise"):
        raise parent
    facts, windows = _logged_facts(client, run, logged_config(client, run_id))
    if not windows:
        raise ConfigError(f"MLflow run {run_id} ({run.info.status}) logged no step-time window yet, which the advice "
                          f"reads (one every `train.log_every` steps): nothing to advise from.")
    source = f"{windows} log window(s) of MLflow run {run_id}, {run.info.status}"
    return advise(facts), facts, source


def advise_at_end(config: Config, metrics: dict[str, Any], *, uri: str | None = None, run_id: str | None = None,
                  prepared: dict[str, Any] | None = None, wall_s: float | None = None) -> list[Recommendation]:
    """The end of a finished run (driver): its advice, printed, and logged on its MLflow run (`run_id`;
    None: tracking off, or the server away). From the MLflow history where it can be read, else from
    the final `metrics`. Never raises: advice must not cost a run that trained."""
    try:
        facts, source = None, "the final log window"
        if run_id and uri:
            try:
                client = MlflowClient(uri)
                facts, windows = _logged_facts(client, client.get_run(run_id), config, wall_s)
                source = f"{windows} log window(s)"
            except Exception as e:  # the history could not be read: the final window still speaks
                log.warning("could not read MLflow run %s's metrics for advice (%s); advising from the final ones",
                            run_id, scrub(e))
        if facts is None:
            facts = facts_from_metrics(config, metrics, RunNotes(**_prep_notes(prepared or {}), wall_s=wall_s))
        recs = advise(facts)
        print(console(recs, source), flush=True)
    except Exception as e:
        log.warning("no advice for this run: %s", scrub(e))
        return []
    if run_id and uri:
        log_advice(uri, run_id, recs, facts, source)
    return recs


def log_advice(uri: str, run_id: str, recs: list[Recommendation], facts: Facts, source: str) -> None:
    """`advice.md` and `advice.json` on the run (a warning where the server refuses)."""
    try:
        client = MlflowClient(uri)
        client.log_text(run_id, markdown(recs, facts, facts.config.name, source), ADVICE_MD)
        client.log_text(run_id, as_json(recs, facts, run_id=run_id, source=source), ADVICE_JSON)
    except Exception as e:
        log.warning("could not log the advice on MLflow run %s: %s", run_id, scrub(e))


def logged_config(client: MlflowClient, run_id: str) -> Config:
    """The config a run logged (`config.yaml`, secrets masked), validated."""
    with tempfile.TemporaryDirectory(prefix="openclaw-advice-") as d, no_progress_bars():
        try:
            path = client.download_artifacts(run_id, "config.yaml", d)
        except Exception:
            raise ConfigError(f"MLflow run {run_id} has no config.yaml: it is not an openclaw training run (or "
                              f"its artifacts cannot be read).") from None
        with open(path) as f:
            return validate(yaml.safe_load(f) or {}, source=f"MLflow run {run_id}'s config.yaml")


def _logged_facts(client: MlflowClient, run, config: Config, wall_s: float | None = None) -> tuple[Facts, int]:
    run_id = run.info.run_id
    per_rank = config.parallelism.pipeline > 1  # only the pipeline rules read each rank's split: 3 keys a rank
    keys = [k for k in run.data.metrics if k in WINDOW_KEYS or (per_rank and RANK_KEY.fullmatch(k))]
    history = {k: [(m.step, m.value) for m in points]
               for k, points in zip(keys, metric_histories(client, run_id, keys))}
    notes = run_notes(run, read_events(client, run_id))  # read_events draws no progress bars
    if wall_s is not None:
        notes.wall_s = wall_s
    windows = len({step for points in history.values() for step, _ in points})
    return facts_from_history(config, history, notes), windows


def run_notes(run, events: list[dict[str, Any]]) -> RunNotes:
    """A logged run's params, attempt and precision events, data preparation and wall time."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    attempts = [e for e in events if e.get("event") in ATTEMPT_EVENTS]
    precision = [e for e in events if e.get("event") == "precision"]
    caches = {k.split(".")[2]: v for k, v in tags.items() if k.startswith("openclaw.data.") and k.endswith(".cache")}
    prep = _prep_notes({name: (cache, metrics.get(f"data/{name}/prepare_s", 0.0)) for name, cache in caches.items()},
                       tags.get("openclaw.data.cache_dir"))
    end = run.info.end_time
    wall = (end - run.info.start_time) / 1000 + (prep["prepare_s"] or 0.0) if end else None  # prepared before it
    last = attempts[-1] if attempts else {}
    return RunNotes(precision=params.get("resolved/precision"),
                    precision_reason=params.get("resolved/precision_reason"),
                    tf32=precision[-1].get("tf32") if precision else None,
                    attempt_starts=[int(e.get("resumed_from_step") or 0) for e in attempts],
                    world_size=last.get("world_size"), accumulation=last.get("accumulation"), wall_s=wall,
                    tensor_group_nodes=last.get("tensor_group_nodes"), model_blocks=last.get("blocks"),
                    workers_per_node=tuple(last["workers_per_node"]) if last.get("workers_per_node") else None, **prep)


def _prep_notes(prepared: dict[str, Any], cache_dir: str | None = None) -> dict[str, Any]:
    """`prepare_s`, `prepare_cache` and `prepare_dir` of the datasets: `Prepared` objects (the driver's), or
    (cache, seconds) pairs and the cache's folder (from MLflow). Seconds count on misses only."""
    pairs = [p if isinstance(p, tuple) else (p.cache, p.prepare_s) for p in prepared.values()]
    caches = {cache for cache, _ in pairs}
    cache = "miss" if "miss" in caches else "hit" if "hit" in caches else ("off" if caches else None)
    spent = sum(s for c, s in pairs if c == "miss")
    folder = cache_dir or next((p.cache_dir for p in prepared.values() if getattr(p, "cache_dir", None)), None)
    return {"prepare_s": spent if pairs else None, "prepare_cache": cache, "prepare_dir": folder}
