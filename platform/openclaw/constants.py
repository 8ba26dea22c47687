"""Environment-variable tunables and fixed names, in one place. Units are in the names."""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from openclaw.errors import ConfigError

DEFAULT_MLFLOW_DB = "mlflow.db"
"""MLflow's sqlite store, in the job's home folder (`job_home`), when no tracking URI is configured."""

HOME_ENV_VAR = "OPENCLAW_HOME"
DEFAULT_HOME = "~/openclaw"
"""Where a `ray job submit` job keeps what relative paths name (runs, the MLflow store, data), as Ray
Train keeps its results in ~/ray_results: the job's working folder is Ray's temporary copy."""

RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in the driver of a submitted job (`ray job submit`), and only there."""


def under_ray_job() -> bool:
    return RAY_JOB_ENV_VAR in os.environ


def openclaw_home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME))


def job_home() -> str:
    """The folder a job's relative paths start from: the working folder, or under `ray job submit`
    (whose working folder Ray deletes when the job ends) `$OPENCLAW_HOME`, by default ~/openclaw."""
    return openclaw_home() if under_ray_job() else os.getcwd()


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the sqlite store in the job's home folder (absolute, so that every
    process of the job, whatever its working folder, writes to the same store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(job_home(), DEFAULT_MLFLOW_DB)}"


JOB_FILE = "openclaw_job.json"
"""Written in the run's storage folder: the MLflow run id, so a re-submitted job continues its run."""

SHIP_PACKAGE_ENV_VAR = "OPENCLAW_SHIP_PACKAGE"
"""Set to 1 (by jobs/*.py when openclaw is not installed) to send the package to workers as a py_module."""

FORWARDED_ENV_PREFIXES = ("OPENCLAW_",)
FORWARDED_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                      "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH")
"""Driver environment variables forwarded to openclaw's Ray processes in their runtime env, which Ray's
dashboard shows and logs: openclaw's tunables, endpoints and regions. No credential."""

SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""Credentials in the driver's environment. They reach openclaw's own processes (training workers, the
tracking service, data preparation tasks, sweep trials) as arguments, held in memory, never through a
runtime env. On a cluster, prefer each node's own environment or an instance role: then nothing travels."""


def forwarded_env() -> dict[str, str]:
    """What goes into the runtime env of openclaw's Ray processes (no credential)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV_VARS}


SECRET_WORDS = ("password", "passwd", "pwd", "passphrase", "secret", "credential", "credentials", "apikey", "dsn",
                "private")
"""Words that mark a secret wherever they stand in a key (`client_secret_value`, `credentials_json`)."""
LAST_SECRET_WORDS = ("key", "token", "auth", "authorization")
"""Words that mark a secret only as a key's last word: `api_key`, `hf_token`, but not a model's
`num_key_value_heads`, `pad_token_id` or `key_dim`."""
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")


def is_secret_key(key: str) -> bool:
    """A key that looks like it holds a secret, its last segment split on `_`, `-` and camelCase: a word
    that names a password, secret, credentials or a private key anywhere in it (`aws_secret_access_key`,
    `private_key_pem`, `credentials_json`), or a key, token or auth as its last word (`api_key`, `apiKey`,
    `hf_token`, `key`, `auth`), or `dsn` or `connection_string`."""
    words = _words(key)
    return words[-1] in LAST_SECRET_WORDS or words[-1].endswith("token") or is_password_key(key)


def is_password_key(key: str) -> bool:
    """A key a word of which names a password, secret, credentials or a private key (not merely a key or a
    token): its value is a secret even when it is a number (`password: 123456`)."""
    words = _words(key)
    return "_".join(words).endswith("connection_string") or any(
        w in SECRET_WORDS or w.endswith(("password", "secret")) or w.startswith("credential") for w in words)


def _words(key: str) -> list[str]:
    return _CAMEL.sub(r"\1_\2", key.rsplit(".", 1)[-1]).lower().replace("-", "_").split("_")


def seconds_setting(name: str, default: float) -> float:
    """An `OPENCLAW_*_S` environment setting: a number of seconds (`default` where unset)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {text!r}: fix it or unset it "
                          f"(default {default:g}).") from None


def secret_env() -> dict[str, str]:
    """The driver's credentials, to hand to openclaw's processes as arguments (`apply_secret_env`)."""
    return {k: os.environ[k] for k in SECRET_ENV_VARS if os.environ.get(k)}


TUNE_PROPAGATED_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
"""What Ray Tune copies from the driver's environment into every trial actor's runtime env (which Ray's
state API shows): a sweep's driver holds them outside its environment while Tune runs."""


@contextlib.contextmanager
def env_without(names: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """This process's environment without `names` for a while (yields what was taken out, put back after)."""
    taken = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield taken
    finally:
        os.environ.update(taken)


@contextlib.contextmanager
def env_with(values: dict[str, str]) -> Iterator[None]:
    """This process's environment with `values` set for a while (what was there before, put back after)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def apply_secret_env(secrets: dict[str, str]) -> None:
    """In a process of the job: the driver's credentials, where this process has none of its own."""
    for key, value in secrets.items():
        os.environ.setdefault(key, value)


PREEMPTION_WATCHER_ENV_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
"""Ray Train's switch for its per-group drain watcher."""

RAY_TRAIN_DEFAULTS = {
    # The controller polls workers (and drains their one-slot report queue) at this interval. Ray's
    # default of 2 s stalls every checkpoint report for up to 2 s and detects dead workers late.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Ray's drain watcher is a new actor process at every worker-group start; openclaw keeps one per run,
    # in the controller's process, instead (`runtime.controller_callbacks.PreemptionNotices`).
    PREEMPTION_WATCHER_ENV_VAR: "0",
}
"""Ray Train tunables openclaw sets in the driver for a run (`ray_train_env`) unless the user set them."""


WORKER_GROUP_START_TIMEOUT_ENV_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Set from `failure.worker_start_timeout_s` unless the user set it in the environment."""

@contextlib.contextmanager
def ray_train_env(worker_start_timeout_s: float) -> Iterator[dict[str, str]]:
    """openclaw's Ray Train tunables, in this process's environment while a run is built and runs (Ray
    forwards them to its controller), each one only where the user has not set it. Yields the ones it
    set. They are removed afterwards, so a later run with another config, and any process started
    later from this one, see only the user's own settings."""
    values = {**RAY_TRAIN_DEFAULTS, WORKER_GROUP_START_TIMEOUT_ENV_VAR: str(worker_start_timeout_s)}
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield added
    finally:
        for key in added:
            os.environ.pop(key, None)


NODE_WATCH_INTERVAL_S_ENV_VAR = "OPENCLAW_NODE_WATCH_INTERVAL_S"
DEFAULT_NODE_WATCH_INTERVAL_S = 0.5
"""How often an elastic run's driver polls the node table for joins and deaths."""


def node_watch_interval_s() -> float:
    return seconds_setting(NODE_WATCH_INTERVAL_S_ENV_VAR, DEFAULT_NODE_WATCH_INTERVAL_S)


NODE_DEATH_WAIT_S_ENV_VAR = "OPENCLAW_NODE_DEATH_WAIT_S"
DEFAULT_NODE_DEATH_WAIT_S = 30.0
"""After a worker failure with an unreachable node: the longest wait for the GCS to declare it dead."""


def node_death_wait_s() -> float:
    return seconds_setting(NODE_DEATH_WAIT_S_ENV_VAR, DEFAULT_NODE_DEATH_WAIT_S)


CHECKPOINT_BEFORE_GROW_S_ENV_VAR = "OPENCLAW_CHECKPOINT_BEFORE_GROW_S"
DEFAULT_CHECKPOINT_BEFORE_GROW_S = 30.0
"""Elastic runs: when nodes join, the longest wait for the workers' checkpoint before Ray may resize."""


def checkpoint_before_grow_s() -> float:
    return seconds_setting(CHECKPOINT_BEFORE_GROW_S_ENV_VAR, DEFAULT_CHECKPOINT_BEFORE_GROW_S)


STOP_GRACE_S_ENV_VAR = "OPENCLAW_STOP_GRACE_S"
DEFAULT_STOP_GRACE_S = 30.0
"""The command line: after a stop at once (SIGTERM before training, or a second SIGTERM or Ctrl-C), the
longest wait for the driver's clean-up (closing the MLflow run, Ray's shutdown) before it exits without."""


def stop_grace_s() -> float:
    return seconds_setting(STOP_GRACE_S_ENV_VAR, DEFAULT_STOP_GRACE_S)
