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
    for folder in (work / "shipped", home / "kept"):
        folder.mkdir(parents=True)
        (folder / "part-0.parquet").write_bytes(b"")
    monkeypatch.chdir(work)
    monkeypatch.setenv(constants.RAY_JOB_ENV_VAR, "{}")
    monkeypatch.setenv(constants.HOME_ENV_VAR, str(home))
    return work, home


@pytest.mark.parametrize("spec,where", [("shipped", "work"), ("kept", "home"), ("shipped/*.parquet", "work"),
                                        ("kept/*.parquet", "home"), ("kept/**/*.parquet", "home")])
def test_a_relative_data_path_or_glob_is_found_where_the_job_has_it(job, spec, where):
    """A glob was tested as a file name (`os.path.exists`), so every glob was refused under a Ray job."""
    work, home = job
    got = place(validate({"data": {"train": spec}})).data.train
    assert got == os.path.join(str(work if where == "work" else home), spec)


@pytest.mark.parametrize("spec", ["missing", "shipped/*.csv", "nowhere/*.parquet"])
def test_a_relative_data_path_found_nowhere_is_refused_by_its_key(job, spec):
    with pytest.raises(DataError, match=r"`data.train`: .* is neither in the job's working folder"):
        place(validate({"data": {"train": spec}}))
