import re

import pytest

from cluster.storage import LAUNCH_DIR_ENV, resolve_storage, validate_name
from ops import artifacts
from ops.errors import UserError


def test_relative_storage_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv(LAUNCH_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("./artifacts") == str(tmp_path.resolve() / "artifacts")


def test_relative_storage_resolves_against_launch_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(LAUNCH_DIR_ENV, str(tmp_path))
    monkeypatch.chdir("/")
    assert resolve_storage("artifacts") == str(tmp_path.resolve() / "artifacts")


def test_relative_storage_in_ray_working_dir_copy_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    copy.mkdir(parents=True)
    monkeypatch.delenv(LAUNCH_DIR_ENV, raising=False)
    monkeypatch.chdir(copy)
    with pytest.raises(UserError, match="temporary copy"):
        resolve_storage("./artifacts")
    assert resolve_storage(str(tmp_path / "abs")) == str(tmp_path / "abs")


def test_uris_pass_through():
    assert resolve_storage("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert artifacts.uri("gs://b/p", "adapters", "x") == "gs://b/p/adapters/x"


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", ".hidden"])
def test_bad_names(name):
    with pytest.raises(UserError, match=f"bad artifact name '{re.escape(name)}': use letters"):
        validate_name(name)


def test_writable_artifact_is_atomic(tmp_path):
    with artifacts.publish(str(tmp_path), "reports", "r") as out:
        (out / "a.json").write_text("1")
        assert not (tmp_path / "reports" / "r").exists()
    assert (tmp_path / "reports" / "r" / "a.json").read_text() == "1"
    with pytest.raises(RuntimeError, match="crash mid-write"):
        with artifacts.publish(str(tmp_path), "reports", "r") as out:
            (out / "a.json").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (tmp_path / "reports" / "r" / "a.json").read_text() == "1"
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["r"]


def test_a_relative_input_path_resolves_against_the_launch_directory(tmp_path, monkeypatch):
    from cluster.storage import LAUNCH_DIR_ENV, launch_path

    launch, job_copy = tmp_path / "launch", tmp_path / "copy"
    (launch / "data").mkdir(parents=True)
    (launch / "data" / "notes.txt").write_text("x")
    job_copy.mkdir()
    (job_copy / "here.txt").write_text("y")
    monkeypatch.chdir(job_copy)
    monkeypatch.delenv(LAUNCH_DIR_ENV, raising=False)
    assert launch_path("data/notes.txt") == "data/notes.txt"  # no launch directory: kept
    monkeypatch.setenv(LAUNCH_DIR_ENV, str(launch))
    assert launch_path("data/notes.txt") == str(launch / "data" / "notes.txt")
    assert launch_path("here.txt") == "here.txt"  # exists where the job runs
    assert launch_path("missing.txt") == "missing.txt"  # the job's own error names what the user typed
    assert launch_path("s3://bucket/x.txt") == "s3://bucket/x.txt"

    from jobs.data import DataConfig
    from jobs.index import IndexConfig

    assert DataConfig(data="data/notes.txt").data == str(launch / "data" / "notes.txt")
    assert IndexConfig(data="data/notes.txt").data == str(launch / "data" / "notes.txt")
    assert DataConfig(data="stdlib").data == "stdlib"
