"""MLflow tracking against a real `mlflow server` over HTTP: runs opened, resumed, nested; params, metrics, tags
and artifacts; secrets redacted everywhere; retries through a server outage and a clear error after the budget."""

from __future__ import annotations

import socket
import threading

import pytest

from dcdit.errors import DCDiTError
from dcdit_platform.secrets import REDACTED, is_secret_name, redact, redact_config, split_credentials
from dcdit_platform.tracking import Tracker, TrackingUnavailable, default_tracking_uri, flat_params


def test_redaction_of_uris_names_and_known_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567890")
    assert redact("http://alice:pa55word@host:5000/api") == "http://alice:***@host:5000/api"
    assert redact("postgresql://u:secret@db/x and s3://bucket/k") == "postgresql://u:***@db/x and s3://bucket/k"
    assert redact("aws_secret_access_key=abcdef123 region=us") == "aws_secret_access_key=*** region=us"
    assert redact("header has tok-1234567890 inside") == "header has *** inside"
    assert redact("plain text, 12 steps, lr=1e-4") == "plain text, 12 steps, lr=1e-4"
    assert all(is_secret_name(k) for k in ("api_key", "AWS_SECRET_ACCESS_KEY", "db_password", "hf_token"))
    assert not any(is_secret_name(k) for k in ("checkpoint.keep", "train.lr", "model.hidden_size"))
    cfg = {"storage": {"secret_access_key": "s3-s3cr3t-value", "uri": "s3://b/p"},
           "tracking": {"uri": "http://bob:hunter2hunter2@h:1", "tags": {"api_token": "zzz-secret-zzz"}}}
    safe = redact_config(cfg)
    assert safe["storage"] == {"secret_access_key": REDACTED, "uri": "s3://b/p"}
    assert safe["tracking"] == {"uri": "http://bob:***@h:1", "tags": {"api_token": REDACTED}}
    # Values seen under secret names are scrubbed from free text afterwards too.
    assert redact("failed with s3-s3cr3t-value") == "failed with ***"
    params = flat_params(cfg)
    assert params["storage.secret_access_key"] == REDACTED and "hunter2" not in params["tracking.uri"]
    assert split_credentials("http://u:p@h:1/x") == ("http://h:1/x", "u", "p")


def test_default_tracking_uri_is_an_absolute_sqlite_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("runs")
    assert uri == f"sqlite:///{tmp_path}/runs/mlflow.db" and uri.startswith("sqlite:////")
    with pytest.raises(DCDiTError, match="needs an MLflow tracking server"):
        default_tracking_uri("s3://bucket/prefix")


def test_runs_params_metrics_tags_and_artifacts_over_http(mlflow_server, capsys):
    tracker = Tracker(mlflow_server.uri_with_credentials("alice", "pw-0123456789"))
    parent = tracker.open_run(experiment="tracking-test", run_name="sweep")
    run_id = tracker.open_run(experiment="tracking-test", run_name="trial-1", parent_run_id=parent,
                              tags={"team": "dcdit", "deploy_key": "k-9876543210"})
    # The same name (and parent) finds the same run; an explicit id resumes it.
    assert tracker.open_run(experiment="tracking-test", run_name="trial-1", parent_run_id=parent) == run_id
    assert tracker.open_run(experiment="tracking-test", run_name="ignored", run_id=run_id) == run_id
    assert [r.info.run_id for r in tracker.child_runs(parent, "tracking-test")] == [run_id]

    tracker.log_params(run_id, {"train.lr": 1e-4, "train.steps": 8, "storage.secret_access_key": "s3-key-value-1"})
    tracker.log_params(run_id, {"train.lr": 1e-4, "train.steps": 12})  # steps changed on resume: a tag, no error
    for step in (1, 2, 3):
        tracker.log_metrics(run_id, {"train/loss": 1.0 / step, "perf/tokens_per_s": 10.0 * step}, step)
    assert tracker.last_logged_step(run_id) == 3
    tracker.log_text(run_id, "uri: http://alice:pw-0123456789@x\nkey: s3-key-value-1\n", "config/resolved.yaml")
    tracker.finish(run_id)
    printed = capsys.readouterr()
    assert "pw-0123456789" not in printed.out + printed.err and "alice:***@" in printed.err  # MLflow's run URL

    run = tracker.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "8" and run.data.tags["dcdit.changed.train.steps"] == "12"
    assert run.data.params["storage.secret_access_key"] == REDACTED
    assert run.data.tags["deploy_key"] == REDACTED and run.data.tags["team"] == "dcdit"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["dcdit.run_name"] == "trial-1"
    assert {"dcdit.git_commit", "dcdit.host", "dcdit.version"} <= set(run.data.tags)
    assert [m.step for m in tracker.metric_history(run_id, "train/loss")] == [1, 2, 3]
    text = tracker.client.download_artifacts(run_id, "config/resolved.yaml")
    content = open(text).read()
    everything = content + repr(run.data.params) + repr(run.data.tags)
    for secret in ("pw-0123456789", "s3-key-value-1", "k-9876543210"):
        assert secret not in everything


class FlakyProxy:
    """A TCP forwarder to the tracking server that can refuse connections (and drop open ones) on demand."""

    def __init__(self, target_port: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.target_port = target_port
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self.came_back = threading.Event()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        self.came_back.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_brief_outage_is_retried_and_a_long_one_fails_clearly(mlflow_server):
    proxy = FlakyProxy(mlflow_server.port)
    proxy.up()
    uri = f"http://carol:pw-outage-42@127.0.0.1:{proxy.port}"
    tracker = Tracker(uri, retry_timeout_s=60)
    run_id = tracker.open_run(experiment="tracking-outage", run_name="r")
    tracker.log_metrics(run_id, {"train/loss": 1.0}, 1)

    proxy.down()
    proxy.came_back.clear()
    threading.Timer(2.0, proxy.up).start()  # back after 2 s: the call keeps retrying and then succeeds
    tracker.log_metrics(run_id, {"train/loss": 0.5}, 2)
    assert proxy.came_back.is_set()  # it could only have succeeded through the restored proxy
    assert tracker.last_logged_step(run_id) == 2

    proxy.down()
    impatient = Tracker(uri, retry_timeout_s=1.0)
    with pytest.raises(TrackingUnavailable) as err:
        impatient.log_metrics(run_id, {"train/loss": 0.25}, 3)
    message = str(err.value)
    assert "unreachable for 1 s" in message and "carol:***@" in message and "pw-outage-42" not in message
    # A permanent problem (an unknown run) is not retried.
    proxy.up()
    with pytest.raises(DCDiTError, match="MLflow .* failed"):
        Tracker(uri, retry_timeout_s=60).log_metrics("0" * 32, {"x": 1.0}, 1)
    proxy.down()


def test_transient_mlflow_errors_are_told_by_type_and_status_code_not_by_text(tmp_path):
    import sqlite3

    import requests
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from dcdit_platform.raycluster import free_port
    from dcdit_platform.tracking import _transient

    assert _transient(requests.ConnectionError("refused"))
    assert _transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))  # HTTP 503
    assert _transient(RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}))  # 429
    assert not _transient(MlflowException("bad value 503 429 timed out", error_code=INVALID_PARAMETER_VALUE))
    assert not _transient(ValueError("Connection refused 503"))  # the old substring test said yes

    # A real SQLite database held by another connection: busy, transient.
    db = tmp_path / "x.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("create table t (x)")
    holder.execute("begin exclusive")
    with pytest.raises(sqlite3.OperationalError) as locked:
        sqlite3.connect(db, timeout=0).execute("insert into t values (1)")
    holder.execute("rollback")
    assert _transient(locked.value)
    # A real MLflow client call to a port nobody listens on: MLflow wraps requests' error, the cause decides.
    with pytest.raises(TrackingUnavailable):
        Tracker(f"http://127.0.0.1:{free_port()}", retry_timeout_s=0).get_run("0" * 32)
