"""Where a `ray job submit` job's relative data paths point (`launch.places`): the job's working folder,
then `$OPENCLAW_HOME`, for folders and globs alike (driver logic; no Ray: the job's variable is set)."""
import os

import pytest

from openclaw import constants
from openclaw.config import validate
from openclaw.errors import DataError
from openclaw.launch.places import place


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A submitted job's driver: its working folder (Ray's copy of `--working-dir`) and `$OPENCLAW_HOME`."""
    work, home = tmp_path / "work", tmp_path / "home"
    for folder in (work / "shipped", home / "kept", home / "shipped"):
        folder.mkdir(parents=True)
        (folder / "part-0.parquet").write_bytes(b"")
    (work / "shipped" / "notes.csv").write_bytes(b"")
    monkeypatch.chdir(work)
    monkeypatch.setenv(constants.RAY_JOB_ENV_VAR, "{}")
    monkeypatch.setenv(constants.HOME_ENV_VAR, str(home))
    return work, home


@pytest.mark.parametrize("spec,where", [("shipped", "work"), ("kept", "home"), ("shipped/*.parquet", "work"),
                                        ("kept/*.parquet", "home"), ("kept/**/*.parquet", "home"),
                                        ("shipped/*.csv", None), ("shipped/*", "work")])
def test_a_relative_data_path_or_glob_is_found_where_the_job_has_it(job, spec, where):
    """A glob was tested as a file name (`os.path.exists`), so every glob was refused under a Ray job. A glob
    counts where it matches Parquet files, as the loader reads it: `shipped/*.csv` matches only in the
    working folder, and no Parquet file there, so the run is refused before it starts."""
    work, home = job
    if where is None:
        with pytest.raises(DataError, match="is neither in the job's working folder"):
            place(validate({"data": {"train": spec}}))
        return
    got = place(validate({"data": {"train": spec}})).data.train
    assert got == os.path.join(str(work if where == "work" else home), spec)


def test_a_glob_under_a_home_whose_name_holds_brackets_is_escaped(tmp_path, monkeypatch):
    """`$OPENCLAW_HOME` at `/data/runs[1]` made every plain path under it a glob ("[1]" a character class)."""
    work, home = tmp_path / "work", tmp_path / "home[1]"
    (home / "kept").mkdir(parents=True)
    (home / "kept" / "part-0.parquet").write_bytes(b"")
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv(constants.RAY_JOB_ENV_VAR, "{}")
    monkeypatch.setenv(constants.HOME_ENV_VAR, str(home))
    assert place(validate({"data": {"train": "kept"}})).data.train == str(home / "kept")
    got = place(validate({"data": {"train": "kept/*.parquet"}})).data.train
    import glob
    assert glob.glob(got) == [str(home / "kept" / "part-0.parquet")]


@pytest.mark.parametrize("spec", ["missing", "kept/*.csv", "nowhere/*.parquet"])
def test_a_relative_data_path_found_nowhere_is_refused_by_its_key(job, spec):
    with pytest.raises(DataError, match=r"`data.train`: .* is neither in the job's working folder"):
        place(validate({"data": {"train": spec}}))


def test_checkpoint_storage_under_the_home_folder_is_expanded(monkeypatch, tmp_path):
    """`checkpoint.storage: ~/runs` is the user's folder, not a folder named `~` in the working folder."""
    from openclaw.launch.preflight import storage_path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage_path(validate({"data": {"train": "x"}, "checkpoint": {"storage": "~/runs"}})) == str(tmp_path / "runs")
    assert storage_path(validate({"data": {"train": "x"}, "checkpoint": {"storage": "s3://b/runs"}})) == "s3://b/runs"
