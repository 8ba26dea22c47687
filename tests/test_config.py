from pathlib import Path

import pytest

from openclaw.config import Config, load_config, validate
from openclaw.errors import ConfigError
from openclaw.tracking.redact import flatten

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "jobs" / "configs" / "digits.yaml"
MIN = {"data": {"train": "x"}}


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.max_steps=7", "train.optimizer.lr=3e-4", "scaling.use_gpu=false",
                             "model.kwargs.hidden=32"], base=MIN)
    assert cfg.train.max_steps == 7 and cfg.train.optimizer.lr == 3e-4
    assert cfg.scaling.use_gpu is False and cfg.model.kwargs == {"hidden": 32}
    assert cfg.tracking.experiment == "openclaw" and cfg.train.precision == "auto"


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_stpes=5"], base=MIN)
    msg = str(e.value)
    assert "`train.max_stpes`" in msg and "max_steps" in msg and "global_batch_size" in msg
    assert "unknown key `train.max_stpes`; did you mean `train.max_steps`? allowed keys there:" in msg
    with pytest.raises(ConfigError) as e:  # nothing close: no guess
        load_config(None, ["train.zzzz=5"], base=MIN)
    assert "did you mean" not in str(e.value) and "unknown key `train.zzzz`; allowed keys there:" in str(e.value)


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"unknown key `trian`; did you mean `train`\? allowed keys there: name, seed"):
        load_config(None, {"trian": {}}, base=MIN)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"`train.max_steps`.*'many'"):
        load_config(None, ["train.max_steps=many"], base=MIN)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"`train.precision`.*'auto', 'fp32', 'bf16', 'fp16' or 'fp8'"):
        load_config(None, ["train.precision=fp64"], base=MIN)


def test_missing_data_section():
    with pytest.raises(ConfigError, match="missing required key `data`"):
        load_config(None, {})


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{p} is not valid YAML at line \d+"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_batch_not_divisible_names_world_sizes():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.global_batch_size=48", "train.micro_batch_size=16", "scaling.min_workers=1",
                           "scaling.max_workers=4"], base=MIN)
    assert "world size 2, 4" in str(e.value) and "global_batch_size=192" in str(e.value)


def test_min_workers_above_max():
    with pytest.raises(ConfigError, match="min_workers"):
        load_config(None, ["scaling.min_workers=3", "scaling.max_workers=2"], base=MIN)


def test_model_and_task_accept_import_paths_only_in_form():
    assert load_config(None, ["model.name=mypkg.models:build", "task=mypkg:loss"], base=MIN).task == "mypkg:loss"
    with pytest.raises(ConfigError, match="`model.name`"):
        load_config(None, ["model.name=resnet"], base=MIN)


def test_malformed_override():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.max_steps"], base=MIN)


def test_resolved_config_round_trips_and_flattens():
    cfg = load_config(None, ["seed=3"], base=MIN)
    again = Config.model_validate(cfg.resolved())
    assert again == cfg
    flat = flatten(cfg.resolved())
    assert flat["train.optimizer.lr"] == cfg.train.optimizer.lr and flat["seed"] == 3


def test_scale_lr_needs_only_the_largest_world_to_divide_the_batch():
    base = {"data": {"train": "d"}, "train": {"global_batch_size": 64, "micro_batch_size": 16},
            "scaling": {"min_workers": 1, "max_workers": 4}}
    with pytest.raises(ConfigError, match="world size 3"):
        validate(base)
    cfg = validate({**base, "elastic": {"on_resize": "scale_lr", "lr_rule": "sqrt"}})
    assert cfg.elastic.on_resize == "scale_lr"
    with pytest.raises(ConfigError, match="elastic.lr_rule"):
        validate({**base, "elastic": {"on_resize": "scale_lr", "lr_rule": "cubic"}})


def test_secret_looking_values_are_redacted_before_logging():
    from openclaw.tracking.redact import REDACTED, is_secret_key, redacted
    for key in ("api_key", "model.kwargs.hf_token", "aws_secret_access_key", "password", "db-password", "key",
                "access_token", "client_secret", "credentials"):
        assert is_secret_key(key), key
    for key in ("keep", "checkpoint.keep", "keyword_weight", "monkey", "tokenizer", "max_tokens", "name",
                "num_key_value_heads", "pad_token_id", "eos_token_id", "key_dim", "numKeyValueHeads"):
        assert not is_secret_key(key), key
    # a checkpoint's config rebuilds its model: a model argument that is a number stays what it was (a user
    # model's `num_key_value_heads` and `pad_token_id` were saved as '***' and the model could not be built)
    tree = {"model": {"kwargs": {"api_key": "sk-123", "hidden": 8, "nested": {"hf_token": "hf_abc"},
                                 "num_key_value_heads": 2, "pad_token_id": 0, "n_token": 256}},
            "tracking": {"password": None}}
    out = redacted(tree)
    assert out["model"]["kwargs"] == {"api_key": REDACTED, "hidden": 8, "nested": {"hf_token": REDACTED},
                                      "num_key_value_heads": 2, "pad_token_id": 0, "n_token": 256}
    # a password is masked even as a number (YAML reads `password: 123456` as one), a list of credentials too
    assert redacted({"password": 123456, "auth": ["user", "hunter2"]}) == {"password": REDACTED, "auth": REDACTED}
    assert out["tracking"]["password"] is None and tree["model"]["kwargs"]["api_key"] == "sk-123"
    # so does a tokenizer's special token (a text model's `pad_token: "<pad>"` was saved as '***')
    special = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<|endoftext|>", "unk_token": "[UNK]"}
    assert redacted(special) == special
    assert set(redacted({"hf_token": "<hf_abc def>", "api_key": "[sk-123]x", "password": "<pad>",
                         "access_token": ["sk-abc123"], "auth": ["<pad>"]}).values()) == {REDACTED}
    assert "sk-123" not in str(flatten(out)) and "hf_abc" not in str(flatten(out))


def test_secret_words_count_run_together_or_joined_by_hyphens_and_a_password_may_hold_an_at():
    """Mutants lived that dropped the `...token`, `...password`/`...secret` and hyphen cases, and that cut
    a URI's user info at its first `@` (leaving the rest of a password in the params)."""
    from openclaw.tracking.redact import is_secret_key, redacted
    for key in ("accesstoken", "authtoken", "dbpassword", "clientsecret", "api-key", "hf-token"):
        assert is_secret_key(key), key
    assert redacted({"uri": "postgresql://alice:p@ss@db/mlflow"}) == {"uri": "postgresql://db/mlflow"}


def test_a_uris_user_info_and_camel_case_secret_keys_are_redacted_too():
    """Only key names were looked at: `tracking.uri: http://alice:pw@host` and `apiKey` went to the MLflow
    params and config.yaml as written; `scrub` left half of a password holding an `@`, and a bare token."""
    from openclaw.tracking.redact import REDACTED, is_secret_key, redacted, scrub
    for key in ("apiKey", "secretAccessKey", "accessKey", "auth", "authorization", "pwd", "passphrase",
                "connection_string", "dsn", "model.kwargs.hfToken",
                # a secret word anywhere, not only last
                "credentials_json", "private_key_pem", "client_secret_value", "secret_key_base"):
        assert is_secret_key(key), key
    for key in ("author", "authority_count", "monkeyPatch", "hidden", "label"):
        assert not is_secret_key(key), key
    out = redacted({"tracking": {"uri": "postgresql://alice:pw@db:5432/mlflow"}, "model": {"kwargs": {
        "apiKey": "sk-live", "urls": ["https://bob:hunter2@host/x", "plain text"]}}})
    assert out == {"tracking": {"uri": "postgresql://db:5432/mlflow"}, "model": {"kwargs": {
        "apiKey": REDACTED, "urls": ["https://host/x", "plain text"]}}}
    said = scrub("GET https://alice:p@ss@host/a failed; https://TOKEN123@host:8/b; http://host:80 for u@x")
    assert said == "GET https://***@host/a failed; https://***@host:8/b; http://host:80 for u@x"


def test_a_database_password_holding_a_slash_is_masked_where_sqlalchemy_reads_one():
    """A user's info was cut at the netloc's first `/`: SQLAlchemy, behind MLflow's database stores, reads
    `postgresql://mlflow:Zx9/kQ2+ab@db:5432/mlflow` as password `Zx9/kQ2+ab` (generated base64 passwords
    hold slashes), and the params, config.yaml, job file and printed messages kept it whole. A URL's path
    holding an `@` keeps its host; a sqlite path its folders."""
    from sqlalchemy.engine import make_url

    from openclaw.tracking.redact import public_uri, redacted, scrub
    uri = "postgresql+psycopg2://mlflow:Zx9/kQ2+ab@db.internal:5432/mlflow?sslmode=require"
    assert make_url(uri).password == "Zx9/kQ2+ab"
    assert public_uri(uri) == "postgresql+psycopg2://db.internal:5432/mlflow?sslmode=require"
    assert redacted({"tracking": {"uri": uri}}) == {"tracking": {"uri": public_uri(uri)}}
    assert public_uri("mysql://root@db/mlflow") == "mysql://db/mlflow"
    assert public_uri("http://host:5000/runs/a@b") == "http://host:5000/runs/a@b"
    assert public_uri("sqlite:////home/a@b/mlflow.db") == "sqlite:////home/a@b/mlflow.db"
    said = scrub(f"could not connect to {uri}: timeout; mysql://u:a/b@db/x and https://h/p@q")
    assert said == ("could not connect to postgresql+psycopg2://***@db.internal:5432/mlflow?sslmode=require: "
                    "timeout; mysql://***@db/x and https://h/p@q")


def test_openclaws_log_lines_mask_credentials_whatever_logs_them(caplog, monkeypatch):
    """Warnings logged an exception as MLflow's client wrote it (`could not record the datasets ...:
    ... http://alice:S3cretPw@host ...`), its user info whole: only printed messages were scrubbed. Every
    record of the `openclaw` logger is now, in any process that imports openclaw."""
    import logging

    import openclaw  # noqa: F401  (the package puts the filter on its logger)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    with caplog.at_level(logging.WARNING, logger="openclaw"):
        logging.getLogger("openclaw").warning("could not record the datasets in MLflow run %s: %s", "r1",
                                              ConnectionError("http://alice:S3cretPw@127.0.0.1:9/api failed"))
        logging.getLogger("openclaw").warning("s3 said %s", "key wJalrXUtnFEMI refused")
    said = [r.getMessage() for r in caplog.records]
    assert said == ["could not record the datasets in MLflow run r1: http://***@127.0.0.1:9/api failed",
                    "s3 said key *** refused"]
    monkeypatch.setattr(logging, "raiseExceptions", False)  # as outside pytest: a handler reports a bad format
    logging.getLogger("openclaw").warning("%d of %s", "not a number")  # (the filter raised it to the caller)


def test_overrides_apply_in_the_order_given_and_a_mapping_merges_into_its_section():
    """A repeated key kept its first place in a dict, so `train={log_every: 5}` given between two
    `train.max_steps` wiped the later one (100, the default); and a mapping replaced its whole section,
    so `{"train": {"max_steps": 7}}` set the file's `lr` back to the default without a word."""
    from openclaw.config import load_config
    got = load_config(DIGITS, ["train.max_steps=5", "train={log_every: 5}", "train.max_steps=7"])
    file = load_config(DIGITS)
    assert (got.train.max_steps, got.train.log_every) == (7, 5)
    assert got.train.optimizer.lr == file.train.optimizer.lr  # the file's, kept
    merged = load_config(DIGITS, {"train": {"max_steps": 7}})
    assert merged.train.max_steps == 7 and merged.train.optimizer.lr == file.train.optimizer.lr


def test_the_sdk_applies_overrides_to_a_loaded_config_and_a_path_with_a_base_is_refused():
    """`openclaw.train(cfg, overrides=[...])` with a loaded `Config` dropped the overrides silently, and
    `load_config(path, base=...)` ignored `base`."""
    from openclaw.config import Config, load_config, with_overrides
    from openclaw.errors import ConfigError
    cfg = load_config(DIGITS)
    got = with_overrides(cfg, ["train.max_steps=7"])
    assert isinstance(got, Config) and got.train.max_steps == 7 and got.data == cfg.data
    assert with_overrides(cfg, None) == cfg
    cfg.scaling.use_gpu, cfg.train.precision = False, "fp8"  # each accepted alone: their section's own checks
    with pytest.raises(ConfigError, match="fp8"):
        with_overrides(cfg, None)
    with pytest.raises(ConfigError, match="not both"):
        load_config(DIGITS, base=cfg.resolved())


def test_a_bad_value_of_a_secret_key_is_not_printed_in_the_error(tmp_path):
    """The error quoted the value it refused (`got ...`): an all-digit MinIO secret, read by YAML as a
    number, was printed whole."""
    from openclaw.config import load_config
    from openclaw.errors import ConfigError
    for over in ({"data.s3.secret_access_key": 12345678901234567890}, {"data.s3.secret_access_key": ["pw1", "pw2"]}):
        with pytest.raises(ConfigError) as e:
            load_config(REPO / "jobs/configs/digits.yaml", over)
        said = str(e.value)
        assert "data.s3.secret_access_key" in said and "1234567890" not in said and "pw1" not in said, said
    with pytest.raises(ConfigError, match=r"got 'x'"):  # other keys still show what was given
        load_config(REPO / "jobs/configs/digits.yaml", {"train.max_steps": "x"})


def test_what_the_driver_hands_the_workers_shows_no_secret_as_text():
    """Ray Train keeps `train_loop_config` as text in its run records (`RAY_TRAIN_ENABLE_STATE_TRACKING=1`,
    the dashboard's Train page): it stringifies what is not JSON, and the dataclass's own repr held the
    driver's credentials, the config's S3 secret and the prepared data's S3 settings."""
    from openclaw.runtime.inputs import LoopInputs
    inputs = LoopInputs(config={"data": {"s3": {"secret_access_key": "CFGSECRET"}}}, run_id="r1", run_dir="/runs/a",
                        data={"train": {"spec": {"s3": {"secret_access_key": "DATASECRET"}}, "shards": []}},
                        secrets={"AWS_SECRET_ACCESS_KEY": "ENVSECRET"}, tracking=None, control=None, progress=None,
                        job_start_time=1.0)
    for text in (str(inputs), repr(inputs), str({"inputs": inputs})):
        assert not any(s in text for s in ("CFGSECRET", "DATASECRET", "ENVSECRET")), text
        assert "r1" in text and "/runs/a" in text


def test_ray_train_tunables_are_set_for_the_run_only_and_leave_the_users_values_alone(monkeypatch):
    import os

    from openclaw import constants
    keys = [*constants.RAY_TRAIN_DEFAULTS, constants.WORKER_GROUP_START_TIMEOUT_ENV_VAR]
    for key in keys:  # recorded, so that the test leaves the environment as it found it
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    with constants.ray_train_env(30.0) as added:
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"  # the user's
        assert os.environ[constants.WORKER_GROUP_START_TIMEOUT_ENV_VAR] == "30.0"
        # Ray's per-group drain watcher is off; openclaw runs its own, once per run.
        assert os.environ[constants.PREEMPTION_WATCHER_ENV_VAR] == "0" and constants.PREEMPTION_WATCHER_ENV_VAR in added
        assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in added
    # Gone after the run: a later run (another config) and a process started from this one see the user's only.
    assert constants.PREEMPTION_WATCHER_ENV_VAR not in os.environ
    assert constants.WORKER_GROUP_START_TIMEOUT_ENV_VAR not in os.environ
    with constants.ray_train_env(12.0):
        assert os.environ[constants.WORKER_GROUP_START_TIMEOUT_ENV_VAR] == "12.0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"

    monkeypatch.setenv(constants.PREEMPTION_WATCHER_ENV_VAR, "1")  # the user wants Ray's own watcher
    with constants.ray_train_env(12.0) as added:
        assert os.environ[constants.PREEMPTION_WATCHER_ENV_VAR] == "1" and constants.PREEMPTION_WATCHER_ENV_VAR not in added
    assert os.environ[constants.PREEMPTION_WATCHER_ENV_VAR] == "1"


def test_every_config_key_has_a_description():
    """Each field's docstring is its description: `openclaw config --schema/--defaults` show it."""
    from pydantic import BaseModel

    from openclaw.config_tree import section_model
    from openclaw.data.config import Transform
    from typing import get_args
    seen, missing, todo = set(), [], [("", Config), *[(f"data.transforms[{t.__name__}]", t)
                                                     for t in get_args(get_args(Transform)[0])]]
    while todo:
        prefix, model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            key = f"{prefix}.{field.alias or name}".lstrip(".")
            if not (field.description or "").strip():
                missing.append(key)
            sub = section_model(field.annotation)
            if sub is not None and issubclass(sub, BaseModel):
                todo.append((key, sub))
    assert len(seen) > 15 and missing == []


@pytest.mark.parametrize("name", ["..", ".data-cache", "a'b", "a/b", "", "trials", "checkpoint_x", " x"])
def test_a_name_is_confined_to_its_folder_and_to_mlflow_filters(name):
    with pytest.raises(ConfigError, match="`name` must start with a letter or digit"):
        load_config(None, {"name": name}, base=MIN)
    assert load_config(None, {"name": "text-lm_2.b"}, base=MIN).name == "text-lm_2.b"


def test_a_resumed_run_may_change_anything_but_its_model_task_optimizer_and_sample_order():
    from openclaw.launch.resume_check import config_changes, is_fixed
    before = load_config(None, ["model.kwargs.hidden=128"], base=MIN).resolved()
    after = load_config(None, ["model.kwargs.hidden=128", "train.global_batch_size=128", "train.optimizer.lr=2e-3"],
                        base=MIN).resolved()
    assert config_changes(before, after) == {"train.global_batch_size": (64, 128),
                                             "train.optimizer.lr": (1e-3, 2e-3)}
    assert not any(is_fixed(k) for k in config_changes(before, after))
    # a model argument added or dropped is a change of the model; a key only a newer openclaw has is not a change
    wider = load_config(None, ["model.kwargs.hidden=128", "model.kwargs.depth=3"], base=MIN).resolved()
    assert config_changes(before, wider) == {"model.kwargs.depth": (None, 3)}
    newer = {**after, "train": {**after["train"], "a_new_key": 1}}
    assert "train.a_new_key" not in config_changes(before, newer)
    assert all(is_fixed(k) for k in ("model.name", "model.kwargs.hidden", "task", "train.optimizer.name"))
    assert not any(is_fixed(k) for k in ("train.optimizer.lr", "modelx", "train.optimizer.name_x", "seeds",
                                         "data.shuffle"))
    # the epoch's sample order: another from the saved position on repeats some samples and skips others
    assert is_fixed("seed") and is_fixed("data.shuffle_window_shards")


def test_the_resume_check_reads_the_newest_complete_checkpoint_and_refuses_another_model(tmp_path):
    import json as _json

    from openclaw.engine import checkpoint as ckpt_io
    from openclaw.launch.resume_check import changes_since_checkpoint
    first = load_config(None, ["model.kwargs.hidden=128"], base=MIN)
    run = tmp_path / "run"
    assert changes_since_checkpoint(first, str(run)) is None  # nothing to resume
    ckpt_io.save(run / "checkpoint_2026-01-01_00-00-00.000001", model={}, trainer={}, state={"step": 10},
                 config=first.resolved())
    newest = run / "checkpoint_2026-01-02_00-00-00.000001"  # newer, but not written in full: no manifest
    newest.mkdir()
    (newest / "config.json").write_text(_json.dumps(load_config(None, ["model.kwargs.hidden=7"], base=MIN).resolved()))
    path, changes = changes_since_checkpoint(load_config(None, ["model.kwargs.hidden=128", "train.max_steps=50"],
                                                         base=MIN), str(run))
    assert path.endswith("checkpoint_2026-01-01_00-00-00.000001") and changes == {"train.max_steps": (first.train.max_steps, 50)}
    with pytest.raises(ConfigError, match=r"`model.kwargs.hidden` was 128, now 64\. Set them back"):
        changes_since_checkpoint(load_config(None, ["model.kwargs.hidden=64"], base=MIN), str(run))
    for key, value in (("seed", 1), ("data.shuffle_window_shards", 4)):  # the epoch's order in progress
        with pytest.raises(ConfigError, match=rf"optimizer or sample order: `{key}` was \d+, now {value}\."):
            changes_since_checkpoint(load_config(None, ["model.kwargs.hidden=128", f"{key}={value}"], base=MIN),
                                     str(run))
    # a built-in's default written out builds the same model: dropout 0.0 is the mlp's (it was refused)
    spelled = load_config(None, ["model.kwargs.hidden=128", "model.kwargs.dropout=0.0", "model.kwargs.depth=2"],
                          base=MIN)
    assert changes_since_checkpoint(spelled, str(run))[1] == {}
    # another layout of the state: each worker refused the checkpoint, attempt after attempt
    with pytest.raises(ConfigError, match=r"written whole, but its `parallelism` \(strategy 'fsdp', tensor 1, "
                                          r"pipeline 1\) keeps the state sharded"):
        changes_since_checkpoint(load_config(None, ["model.kwargs.hidden=128", "parallelism.strategy=fsdp"],
                                             base=MIN), str(run))


def test_parallelism_keys_the_layout_makes_no_use_of_are_named_before_the_run(digits_dir, tmp_path, capsys):
    """A key set away from its default where the layout ignores it (DDP's buckets under FSDP, a pipeline
    schedule without a pipeline, ...) is not an error, since a sweep may try it beside a layout it does not
    apply to, but the preflight says so before anything starts."""
    from openclaw.engine.parallel.config import ParallelismConfig as P
    from openclaw.launch.preflight import preflight
    assert P().unused_settings() == [] and P(strategy="fsdp", reshard_after_forward=False).unused_settings() == []
    assert P(pipeline=2, pipeline_schedule="gpipe", microbatches=8, bucket_cap_mb=25).unused_settings() == []
    assert P(tensor=2, loss_parallel=False, reshard_after_forward=False).unused_settings() == []
    unused = P(strategy="fsdp", bucket_cap_mb=10, loss_parallel=False, pipeline_schedule="gpipe", microbatches=8)
    assert [line.split("`")[1] for line in unused.unused_settings()] == [
        "parallelism.bucket_cap_mb", "parallelism.loss_parallel", "parallelism.pipeline_schedule",
        "parallelism.microbatches"]
    assert P(reshard_after_forward=False).unused_settings() == [
        "`parallelism.reshard_after_forward` (false) applies only to sharded parameters (`strategy: fsdp`, "
        "`tensor` or `pipeline` above 1); this run makes no use of it."]

    from conftest import digits_config
    preflight(digits_config(digits_dir, tmp_path, "sqlite:///unused.db", **{"parallelism.bucket_cap_mb": 5}))
    out = capsys.readouterr().out
    assert out.count("openclaw: note:") == 0  # DDP: the buckets apply
    preflight(digits_config(digits_dir, tmp_path, "sqlite:///unused.db", **{
        "parallelism.strategy": "fsdp", "parallelism.bucket_cap_mb": 5}))
    assert "openclaw: note: `parallelism.bucket_cap_mb` (5.0) applies only to DDP's" in capsys.readouterr().out


@pytest.mark.parametrize("override,message", [
    ("seed=-1", r"`seed`: Input should be greater than or equal to 0 \(got -1\) \(set by an override\)"),
    ("train.optimizer.betas=[0.9, 1.5]", r"`train.optimizer.betas.1`: Input should be less than 1 \(got 1.5\)"),
    ("train.optimizer.betas=[0.9]", r"`train.optimizer.betas` needs more items \(item 1, counting from 0, is missing\)"),
    ("scaling.resources_per_worker.CPU=-1", r"`scaling.resources_per_worker.CPU` must be 0 or more \(got -1\)"),
    ("scaling.resources_per_worker={cpu: 1}", r"`scaling.resources_per_worker.cpu`: Ray's resource is `CPU` \(its names "
                                              r"are case-sensitive"),
])
def test_values_the_workers_would_refuse_are_refused_before_they_start(override, message):
    """Each of these passed the config and failed in every worker, three attempts in a row (a negative seed
    in numpy's sample order, a beta of 1 or more in torch's Adam), or asked Ray for what no node has."""
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [override])


def test_an_override_names_the_key_it_set_and_reaches_into_a_sweeps_space():
    """A sweep's space is keyed by dotted names: `--set sweep.space.train.optimizer.lr=...` replaces that
    entry (it once became a nested key the space refused, naming no allowed keys)."""
    sweep = REPO / "jobs" / "configs" / "digits-sweep.yaml"
    cfg = load_config(sweep, ["sweep.space.train.optimizer.lr={loguniform: [1e-4, 1e-2]}"])
    assert cfg.sweep.space["train.optimizer.lr"].loguniform == (1e-4, 1e-2)
    with pytest.raises(ConfigError, match=r"unknown key `train.max_step`; did you mean `train.max_steps`\?.* \(set by an "
                                          r"override\)\.$"):
        load_config(DIGITS, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"overrides must be a list of 'dotted.key=value' strings or a dict, not one"):
        load_config(DIGITS, "train.max_steps=200")


def test_a_key_written_twice_in_the_yaml_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word: the first `max_steps` was ignored."""
    path = tmp_path / "twice.yaml"
    path.write_text("data:\n  train: x\ntrain:\n  max_steps: 10\n  log_every: 5\n  max_steps: 30\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML at line 6, column 3: key 'max_steps' is "
                                          r"written twice in one mapping \(lines 4 and 6\); keep one\.$"):
        load_config(path)


def test_yaml_merge_keys_load_and_keys_they_bring_in_may_be_overridden_there(tmp_path):
    """`<<: *defaults` (a YAML merge key) was refused as "not valid YAML": the duplicate-key check built
    each key before PyYAML expanded the merge. A key the merge brings in and the mapping sets again is
    YAML's override, not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text("data:\n  train: x\nckpt: &ck {every_steps: 5, keep: 4}\n"
                    "checkpoint:\n  <<: *ck\n  keep: 2\n")
    from openclaw.config_files import read_yaml
    assert read_yaml(path)["checkpoint"] == {"every_steps": 5, "keep": 2}


def test_an_override_reaches_into_a_sweep_space_that_holds_no_dotted_key_yet():
    """Whether `sweep.space` took the rest of a key whole was guessed from the keys already in it: in a
    config whose space held none (or only `seed`), `sweep.space.train.optimizer.lr=...` was refused."""
    from openclaw.config import load_config
    for space in ({}, {"seed": {"choice": [1, 2]}}):
        got = load_config(DIGITS, [f"sweep={{space: {space}, search: random}}".replace("'", ""),
                                   "sweep.space.train.optimizer.lr={loguniform: [1.0e-4, 1.0e-2]}"])
        assert got.sweep.space["train.optimizer.lr"].kind == "loguniform"


@pytest.mark.parametrize("override, said", [
    ("data.transforms=[{op: cast, column: y, dtype: int64, bogus: 1}]",
     "unknown key `data.transforms.0.bogus`; allowed keys there: op, column, dtype"),
    ("data.transforms=[{op: normalize, colum: x, mean: 0.5, std: 0.5}]",
     "unknown key `data.transforms.0.colum`; did you mean `data.transforms.0.column`?"),
    ("sweep={space: {train.optimizer.lr: {choyce: [1, 2]}}}",
     "unknown key `sweep.space.train.optimizer.lr.choyce`; did you mean `sweep.space.train.optimizer.lr.choice`?"),
])
def test_an_unknown_key_inside_a_list_or_a_mapping_of_sections_is_named_as_written(override, said):
    """Inside `data.transforms` the error named the transform's tag as a key (`data.transforms.0.cast.bogus`)
    and said "that is a value, not a section"; inside `sweep.space` likewise, with no keys allowed there."""
    from openclaw.config import load_config
    from openclaw.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, [override])
    assert said in str(e.value), str(e.value)
    assert "that is a value, not a section" not in str(e.value)


def test_a_wrong_item_in_a_list_of_ranks_is_one_error_at_its_key():
    from openclaw.config import load_config
    from openclaw.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, ["profile.ranks=[a]"])
    assert "`profile.ranks.0`" in str(e.value) and "list[int]" not in str(e.value), str(e.value)


@pytest.mark.parametrize("override", ["train.max_steps=yes", "train.eval_every=no", "train.optimizer.lr=true",
                                      "seed=true", "profile.ranks=true", "profile.ranks=[0, true]",
                                      "data.shuffle_window_shards=off"])
def test_a_boolean_is_no_number(override):
    """YAML reads yes/no/on/off/true/false as booleans, and pydantic took them as 1 and 0: `max_steps=yes`
    trained one step, and `profile.ranks: true` (meant as every rank) profiled rank 1."""
    from openclaw.config import load_config
    from openclaw.errors import ConfigError
    with pytest.raises(ConfigError, match=r"must be a number, not a boolean") as e:
        load_config(DIGITS, [override, "train.max_stepz=3"])
    # said as coming from the override, beside the config's other problems (not one at a time)
    assert "not a boolean (YAML reads true/false/yes/no/on/off as booleans) (set by an override)" in str(e.value)
    assert "unknown key `train.max_stepz`" in str(e.value)


def test_a_boolean_inside_a_list_or_mapping_of_sections_is_no_number_either():
    """The check stopped at lists and mappings: a transform's `std: yes` normalized by 1.0, and a sweep's
    `uniform: [no, yes]` searched [0, 1]."""
    from openclaw.config import load_config
    from openclaw.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, ["data.transforms=[{op: cast, column: x, dtype: int64}, {op: normalize, column: x, "
                             "std: yes}, {op: tokenize_bytes, column: t, seq_len: on}, {op: to_tensor, "
                             "columns: [a], out: z}, {op: normalize, column: z, mean: off}]",
                             "sweep.space={train.optimizer.lr: {uniform: [no, yes]}}"])
    said = str(e.value)
    for key in ("data.transforms.1.std", "data.transforms.2.seq_len", "data.transforms.4.mean",
                "sweep.space.train.optimizer.lr.uniform"):
        assert f"`{key}` must be a number, not a boolean" in said, said
    assert said.count("not a boolean") == 4, said


def test_booleans_still_set_the_keys_that_take_them():
    from openclaw.config import load_config
    got = load_config(DIGITS, ["scaling.use_gpu=true", "train.compile=true", "train.flush_denormal=false"])
    assert got.scaling.use_gpu is True and got.train.compile is True and got.train.flush_denormal is False


def test_settings_that_work_against_each_other_are_noted_before_the_run():
    """Each was accepted without a word: a warmup as long as the run, validation on the training data,
    an evaluation cadence with nothing to evaluate."""
    quiet = load_config(DIGITS)
    assert quiet.notes() == []
    noted = load_config(DIGITS, ["train.schedule.warmup_steps=500", "train.max_steps=30",
                                 f"data.val={quiet.data.train}"])
    assert noted.notes() == ["`train.schedule.warmup_steps` (500) is not below `train.max_steps` (30): the LR never "
                             "reaches `train.optimizer.lr`, and its cosine decay never starts.",
                             "`data.val` is `data.train`: the validation loss is measured on the training data."]
    blind = load_config(DIGITS, ["data.val=null", "train.eval_every=10"])
    assert blind.notes() == ["`train.eval_every` and `train.eval_rows` need `data.val`, which is not set: this run "
                             "does not evaluate."]


def test_a_value_no_branch_of_a_union_takes_is_one_error_under_its_key():
    """pydantic names the branches it tried in the location: the errors read `scaling.use_gpu.bool` and
    `scaling.use_gpu.literal['auto']`, two keys that do not exist."""
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, ["scaling.use_gpu=maybe"])
    assert str(e.value).endswith(": `scaling.use_gpu` should be a valid boolean; or 'auto' (got 'maybe') "
                                 "(set by an override).")
    with pytest.raises(ConfigError) as e:  # a mapping went into the section's branch: its own error, under the key
        load_config(DIGITS, ["train.compile={mode: fast}"])
    assert "`train.compile.mode`: Input should be 'default'" in str(e.value) and "bool" not in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key `train.compile.modes`; did you mean `train.compile.mode`\?"):
        load_config(DIGITS, ["train.compile={modes: fast}"])


def test_load_config_leaves_its_base_as_it_was():
    """Overrides were set into the caller's own nested dicts: the next config built on the same base
    carried them (an SDK user's base config, and this file's MIN, once a test set a `data.` key)."""
    base = {"data": {"train": "x"}, "train": {"max_steps": 10}}
    cfg = load_config(None, ["data.shuffle_window_shards=4", "train.max_steps=20"], base=base)
    assert cfg.data.shuffle_window_shards == 4 and cfg.train.max_steps == 20
    assert base == {"data": {"train": "x"}, "train": {"max_steps": 10}}
    assert load_config(None, [], base=base).data.shuffle_window_shards == 8


@pytest.mark.parametrize("key", ["data.cache.dir", "data.shard_cache.dir"])
def test_a_cache_folder_given_as_a_uri_is_refused(key):
    """`data.cache.dir: s3://bucket/prep` became a local folder named `s3:` in the working folder, which
    the other nodes never saw."""
    with pytest.raises(ConfigError, match=rf"`{key}`: must be a folder .*, not a URI like s3://\.\.\."):
        load_config(None, {key: "s3://bucket/prep"}, base=MIN)
    assert load_config(None, {key: "/mnt/shared/prep"}, base=MIN).model_dump()["data"]


@pytest.mark.parametrize("override,message", [
    ({"name": "Trials"}, r"`name` must start with a letter"),  # a case-insensitive filesystem's `trials` folder
    ({"data.label": "x"}, r"`data.label` names the same column as `data.features` \('x'\)\. Set it to the column"),
    ({"task": "language_modeling", "data.label": "x"}, r"Language modeling takes its targets from the features"),
    ({"parallelism.tensor": 2, "scaling.min_workers": 1, "scaling.max_workers": 4},
     r"`scaling.min_workers` \(1\) and `scaling.max_workers` \(4\) must be multiples of .* = 2: 1 is not"),
    ({"train.global_batch_size": 4, "train.micro_batch_size": 1, "scaling.min_workers": 1, "scaling.max_workers": 4},
     r"it is not for world size 3\."),  # a world size between the ends
    ({"data.on_bad_shard": "skip", "checkpoint.storage": "s3://bucket/runs"}, r"`data.on_bad_shard: skip` needs"),
    ({"data.transforms": [{"op": "cast", "column": "x", "dtype": "float32"}], "checkpoint.storage": "gs://b/runs"},
     r"`checkpoint.storage` is the URI gs://b/runs"),
    ({"data.cache.dir": "gs://bucket/prep"}, r"not a URI like gs://"),
    ({"data.cache.max_bytes": 0}, r"`data.cache.max_bytes`: Input should be greater than 0"),
    ({"data.shuffle_window_shards": -1}, r"`data.shuffle_window_shards`: Input should be greater than or equal to 0"),
    ({"data.transforms": [{"op": "normalize", "column": "x", "std": 0}]}, r"`data.transforms.0.std`: Input should be "
                                                                           r"greater than 0"),
    ({"data.transforms": [{"op": "tokenize_bytes", "column": "t", "seq_len": 0}]}, r"`data.transforms.0.seq_len`"),
    ({"data.transforms": [{"op": "map_batches", "fn": "mod:"}]}, r"`fn` must be a `module:function` import path"),
    ({"model.name": ":fn"}, r"`model.name` must be one of mlp, gpt or a `module:function` import path"),
    ({"parallelism.microbatches": "many"}, r"`parallelism.microbatches` should be a valid integer; or 'auto' "
                                           r"\(got 'many'\)"),
])
def test_each_refusal_names_its_key_and_what_it_takes(override, message):
    """Refusals a mutation of the config's checks survived: nothing had tried them."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, override, base=MIN)


def test_an_error_a_section_raises_about_an_overridden_key_says_the_override_set_it():
    """The section's own check fails at the section (`parallelism`), the override set a key below it."""
    with pytest.raises(ConfigError, match=r"`parallelism.microbatches` must be `auto` or at least 1, got 0 "
                                          r"\(set by an override\)\.$"):
        load_config(DIGITS, ["parallelism.microbatches=0"])


def test_a_warmup_as_long_as_the_run_and_eval_rows_without_val_are_noted():
    assert load_config(None, {"train.schedule.warmup_steps": 30, "train.max_steps": 30}, base=MIN).notes()[0].startswith(
        "`train.schedule.warmup_steps` (30) is not below `train.max_steps` (30)")
    assert load_config(None, {"train.eval_rows": 100}, base=MIN).notes() == [
        "`train.eval_every` and `train.eval_rows` need `data.val`, which is not set: this run does not evaluate."]


def test_a_config_set_in_code_is_checked_and_takes_its_keys_by_field_name_too():
    """An SDK user's assignment is validated (`validate_assignment`), and a key whose YAML name is a Python
    keyword (`checkpoint.async`) is also taken by its field name (`async_`)."""
    from pydantic import ValidationError

    from openclaw.runtime.config import CheckpointConfig
    cfg = load_config(None, {}, base=MIN)
    with pytest.raises(ValidationError):
        cfg.train.max_steps = -1
    assert CheckpointConfig(async_=True).async_ is True and CheckpointConfig(**{"async": True}).async_ is True
