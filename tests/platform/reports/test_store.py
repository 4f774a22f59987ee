"""Where `dcdit report NAME` finds a sweep or run it is not told the store of: the record the sweep or training run
left in a default storage root names its MLflow store; nothing is created when nothing is found."""

from __future__ import annotations

import json

import pytest

from dcdit_platform.cli import main
from dcdit_platform.reports import resolve_store
from dcdit_platform.reports.build import DEFAULT_STORAGES
from dcdit_platform.runs import RUN_RECORD
from dcdit_platform.sweeps.state import SWEEP_RECORD


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _record(path, tracking_uri: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": path.parent.name, "tracking_uri": tracking_uri}))


def test_the_quickstart_sweep_and_a_training_run_are_found_by_their_records(cwd):
    quickstart_db = f"sqlite:///{cwd}/dcdit-quickstart/mlflow.db"
    _record(cwd / "dcdit-quickstart" / "runs" / "quickstart" / SWEEP_RECORD, quickstart_db)
    _record(cwd / "dcdit-runs" / "smoke" / RUN_RECORD, f"sqlite:///{cwd}/dcdit-runs/mlflow.db")
    assert resolve_store("quickstart", None, None) == (quickstart_db, str(cwd / "dcdit-quickstart" / "runs"))
    assert resolve_store("smoke", None, None) == (f"sqlite:///{cwd}/dcdit-runs/mlflow.db", str(cwd / "dcdit-runs"))
    # Flags win over records: --tracking-uri as given, --storage's own sqlite store.
    assert resolve_store("quickstart", "http://127.0.0.1:5000", None) == ("http://127.0.0.1:5000", None)
    assert resolve_store("quickstart", None, str(cwd / "elsewhere")) == (
        f"sqlite:///{cwd}/elsewhere/mlflow.db", str(cwd / "elsewhere"))
    assert not (cwd / "elsewhere").exists()


def test_a_redacted_recorded_uri_is_not_used_and_unknown_names_create_nothing(cwd, capsys):
    _record(cwd / "dcdit-runs" / "remote" / SWEEP_RECORD, "http://user:***@mlflow.example.com")
    assert resolve_store("remote", None, None) == (f"sqlite:///{cwd}/dcdit-runs/mlflow.db", None)
    (cwd / "dcdit-runs" / "remote" / SWEEP_RECORD).unlink()
    (cwd / "dcdit-runs" / "remote").rmdir()
    (cwd / "dcdit-runs").rmdir()
    assert main(["report", "nothing-here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nor a sweep or run 'nothing-here' in ./dcdit-runs, ./dcdit-quickstart/runs" in err[0]
    assert list(cwd.iterdir()) == []  # no empty dcdit-runs/ left behind


def test_the_searched_roots_are_the_commands_defaults():
    from dcdit_platform.config.sections import StorageSection
    from dcdit_platform.quickstart import DEFAULT_OUT, STORAGE_DIR

    assert DEFAULT_STORAGES == (StorageSection().uri.removeprefix("./"), f"{DEFAULT_OUT}/{STORAGE_DIR}")
