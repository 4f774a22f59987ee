"""MLflow, the one module that talks to it: open or resume runs (parents and children), flattened params, step
metrics, tags, artifacts; secret redaction on everything that leaves the process; retries with back-off when
the tracking server is briefly unreachable, then a one-line DCDiTError.

Every call goes through `MlflowClient` with an explicit run id, so the same code works on the driver, in a Ray
Train worker (whose working directory Ray changes) and in a Tune trial.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from PIL import Image

from dcdit.errors import DCDiTError
from dcdit_platform.config import flatten
from dcdit_platform.run_tags import code_tags
from dcdit_platform.secrets import REDACTED, is_secret_name, redact, register_secret, split_credentials

T = TypeVar("T")

RUN_NAME_TAG = "dcdit.run_name"
PARENT_TAG = "mlflow.parentRunId"
# The slug of a run's default evaluation protocol, whose metrics have the stable keys eval/fd, eval/fid, ...
EVAL_PROTOCOL_TAG = "dcdit.eval_protocol"
PROGRESS_METRIC = "train/loss"  # logged at every logging step: its last step is the run's logged progress

# --- URIs ----------------------------------------------------------------------------------------------------------

def default_tracking_uri(storage_uri: str, *, create: bool = True) -> str:
    """sqlite:////<absolute storage path>/mlflow.db for local storage (the folder created unless `create` is False:
    readers such as `dcdit report` leave nothing behind); S3 storage needs a server (DCDiTError)."""
    if storage_uri.startswith("s3://"):
        raise DCDiTError(f"storage {storage_uri} is on S3, so the run needs an MLflow tracking server: pass "
                         "--tracking-uri http://HOST:PORT (or set tracking.uri or MLFLOW_TRACKING_URI)")
    path = storage_uri[len("file://"):] if storage_uri.startswith("file://") else storage_uri
    root = Path(path).expanduser().resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    # An absolute path: MLflow's default ./mlflow.db is relative, and Ray Train changes workers' directories.
    return f"sqlite:///{root.as_posix()}/mlflow.db"


TRACKING_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(explicit: str | None, storage_uri: str, *, create: bool = True) -> str:
    """The tracking URI of a command, by one rule for all of them: the explicit one (--tracking-uri, or the
    experiment's tracking.uri, which the flag overrides), else $MLFLOW_TRACKING_URI as MLflow's own clients read it,
    else the SQLite store in the storage (`default_tracking_uri`). `dcdit quickstart` and `dcdit study` pass their
    own store explicitly: their results stay self-contained whatever the environment says."""
    if explicit:
        return explicit
    if os.environ.get(TRACKING_ENV, "").strip():
        return os.environ[TRACKING_ENV].strip()
    return default_tracking_uri(storage_uri, create=create)


def local_artifact_root(tracking_uri: str) -> str | None:
    """For a SQLite store, artifacts live next to the database (never in a worker's working directory)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None


# --- the client ----------------------------------------------------------------------------------------------------

class TrackingUnavailable(DCDiTError):
    """The tracking server stayed unreachable for the whole retry budget."""


# SQLite's "busy" and "locked" result codes: another process holds the database for a moment.
_SQLITE_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _transient(err: BaseException) -> bool:
    """Errors worth retrying, by exception type and status code (never by message text): connection failures and
    timeouts, HTTP answers 429 and 5xx (MLflow maps them to its error codes; 501 is a permanent "not
    implemented"), and a busy SQLite database. Follows the chain of causes, as MLflow wraps what requests raises."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if isinstance(err, requests.HTTPError) and err.response is not None:
            return _retryable_status(err.response.status_code)
        if isinstance(err, MlflowException) and err.__context__ is None and err.__cause__ is None:
            return _retryable_status(err.get_http_status_code())
        if isinstance(err, sqlite3.OperationalError) and getattr(err, "sqlite_errorcode", None) in _SQLITE_BUSY:
            return True
        err = err.__cause__ or err.__context__ or getattr(err, "orig", None)
    return False


def _retryable_status(status: int) -> bool:
    return status == 429 or (status >= 500 and status != 501)


class Tracker:
    """An MLflow client for one tracking URI with redaction and retries on every call.

    `retry_timeout_s` bounds how long one call keeps retrying (exponential back-off from 0.5 s to 30 s).
    """

    def __init__(self, uri: str, *, retry_timeout_s: float = 300.0):
        # MLflow's own HTTP retries would hide how long we wait; this loop owns the back-off instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        # Reports download a few small artifacts per run: MLflow's progress bars would bury the command's own lines.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # A new SQLite store announces its tables at INFO ("Creating initial MLflow database tables..."): noise.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        _, _, password = split_credentials(uri)
        register_secret(password)
        self.uri = uri
        self.display_uri = redact(uri)
        self.retry_timeout_s = float(retry_timeout_s)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = self._call("connect", lambda: MlflowClient(tracking_uri=self.uri))
        return self._client

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_timeout_s
        delay = 0.5
        while True:
            try:
                return fn()
            except DCDiTError:
                raise
            except Exception as err:  # noqa: BLE001 - MLflow raises many types; classify, redact, re-raise
                detail = " ".join(redact(err).split())[:300] or type(err).__name__
                if not _transient(err):
                    raise DCDiTError(f"MLflow {what} failed at {self.display_uri}: {detail}") from None
                if time.monotonic() + delay > deadline:
                    raise TrackingUnavailable(
                        f"MLflow tracking server {self.display_uri} unreachable for {self.retry_timeout_s:.0f} s "
                        f"({what}): {detail}") from None
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Any other MLflow call (`what` names it in errors) with the same retries and one-line errors."""
        return self._call(what, fn)

    # --- experiments and runs -------------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created when missing (artifacts next to a local SQLite store)."""
        experiment = self._call("get experiment", lambda: self.client.get_experiment_by_name(name))
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise DCDiTError(f"MLflow experiment {name!r} is deleted; restore it or choose another "
                                 "tracking.experiment")
            return experiment.experiment_id
        location = local_artifact_root(self.uri)

        def create() -> str:
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception as err:  # created concurrently by another process
                if "RESOURCE_ALREADY_EXISTS" in str(getattr(err, "error_code", "")) or "already exists" in str(err):
                    return self.client.get_experiment_by_name(name).experiment_id
                raise

        experiment_id = self._call("create experiment", create)
        self._drop_empty_default_experiment()
        return experiment_id

    def _drop_empty_default_experiment(self) -> None:
        """A new SQLite store comes with an empty experiment "Default" (id 0) that no run here uses: it is deleted
        (restorable in MLflow) so `mlflow ui` shows the experiments that hold runs. Never on a tracking server, whose
        Default belongs to its other users."""
        if not self.uri.startswith("sqlite:"):
            return
        with contextlib.suppress(DCDiTError):  # best effort: another process may have deleted it already
            default = self._call("get experiment", lambda: self.client.get_experiment("0"))
            empty = not self._call("search runs", lambda: self.client.search_runs(["0"], max_results=1))
            if default.lifecycle_stage == "active" and default.name == "Default" and empty:
                self._call("delete experiment", lambda: self.client.delete_experiment("0"))

    def open_run(self, *, experiment: str, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, Any] | None = None) -> str:
        """The run id of `run_name`: the given `run_id` (resumed), else the experiment's run tagged with that name
        (a run that crashed before its first checkpoint), else a new run; marked RUNNING either way."""
        if run_id is not None:
            run = self._call("get run", lambda: _get_run_or_none(self.client, run_id))
            if run is None:
                raise DCDiTError(f"the checkpoint belongs to MLflow run {run_id}, which {self.display_uri} does not "
                                 "know; resume with the tracking URI the run was started with (--tracking-uri)")
            self._call("mark run running", lambda: self.client.update_run(run_id, status="RUNNING"))
            return run_id
        exp_id = self.experiment_id(experiment)
        query = f"tags.`{RUN_NAME_TAG}` = '{_quote(run_name)}'"
        if parent_run_id:
            query += f" and tags.`{PARENT_TAG}` = '{_quote(parent_run_id)}'"
        found = self._call("search runs", lambda: self.client.search_runs(
            [exp_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]))
        if found:
            run_id = found[0].info.run_id
            self._call("mark run running", lambda: self.client.update_run(run_id, status="RUNNING"))
            return run_id
        all_tags = {**code_tags(), **(tags or {}), RUN_NAME_TAG: run_name}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        all_tags = {k: redact(v) if not is_secret_name(k) else REDACTED for k, v in all_tags.items()}
        run = self._call("create run", lambda: self.client.create_run(exp_id, tags=all_tags, run_name=run_name))
        return run.info.run_id

    def child_runs(self, parent_run_id: str, experiment: str) -> list:
        """Runs whose parent is `parent_run_id` (sweeps)."""
        exp_id = self.experiment_id(experiment)
        return list(self._call("search runs", lambda: self.client.search_runs(
            [exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{_quote(parent_run_id)}'", max_results=10_000)))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED. MLflow prints the run's URL (with any user:password@ of the tracking URI)
        to stdout here; it is shown redacted on stderr instead, so stdout stays clean for --json."""
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self._call("end run", lambda: self.client.set_terminated(run_id, status))
        if printed.getvalue().strip():
            sys.stderr.write(redact(printed.getvalue()))

    def get_run(self, run_id: str):
        return self._call("get run", lambda: self.client.get_run(run_id))

    # --- params, tags, metrics, artifacts ----------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log flattened params (secret-named ones redacted). Params are immutable in MLflow: values that changed
        since an earlier attempt of the run are recorded as `dcdit.changed.<key>` tags instead."""
        clean = {k: _param_value(k, v) for k, v in params.items()}
        existing = self.get_run(run_id).data.params
        new = [Param(k, v) for k, v in clean.items() if k not in existing]
        changed = [RunTag(f"dcdit.changed.{k}", v) for k, v in clean.items() if k in existing and existing[k] != v]
        for i in range(0, len(new), 100):
            chunk = new[i:i + 100]
            self._call("log params", lambda: self.client.log_batch(run_id, params=chunk, synchronous=True))
        if changed:
            self._call("set tags", lambda: self.client.log_batch(run_id, tags=changed, synchronous=True))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        items = [RunTag(k, REDACTED if is_secret_name(k) else redact(v)[:5000]) for k, v in tags.items()]
        if items:
            self._call("set tags", lambda: self.client.log_batch(run_id, tags=items, synchronous=True))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int,
                    dataset: tuple[str, str] | None = None) -> None:
        self.log_metric_records(run_id, [{"step": step, "metrics": metrics}], dataset)

    def log_metric_records(self, run_id: str, records: list[dict], dataset: tuple[str, str] | None = None) -> None:
        """Log [{"step": s, "metrics": {name: value}}, ...] in batches of 1000 values, measured on `dataset`
        (name, digest) when given. Every value must be finite: a NaN in MLflow would read as a measurement
        (DCDiTError naming the metric instead)."""
        name, digest = dataset or (None, None)
        now = int(time.time() * 1000)
        items = []
        for record in records:
            for key, value in record["metrics"].items():
                if value is None:
                    continue
                if not math.isfinite(float(value)):
                    raise DCDiTError(f"metric {key}={value} at step {record['step']} is not finite; not logged")
                items.append(Metric(key, float(value), now, int(record["step"]), dataset_name=name,
                                    dataset_digest=digest))
        for i in range(0, len(items), 1000):
            chunk = items[i:i + 1000]
            self._call("log metrics", lambda: self.client.log_batch(run_id, metrics=chunk, synchronous=True))

    def last_logged_step(self, run_id: str, key: str = PROGRESS_METRIC) -> int:
        """The highest step at which `key` was logged (0 if never): steps up to it are not logged again, so a
        run resumed from an older checkpoint than its newest never logs a step twice."""
        history = self._call("read metric history", lambda: self.client.get_metric_history(run_id, key))
        return max((m.step for m in history), default=0)

    def metric_history(self, run_id: str, key: str) -> list:
        return list(self._call("read metric history", lambda: self.client.get_metric_history(run_id, key)))

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log artifact", lambda: self.client.log_artifact(run_id, str(local_path), artifact_path))

    def log_image(self, run_id: str, path: str | os.PathLike, key: str, step: int) -> None:
        """A PNG as an MLflow image with a key and step: the UI's image view steps through it with a slider."""
        with Image.open(path) as image:
            picture = image.convert("RGB")
        self._call("log image", lambda: self.client.log_image(run_id, picture, key=key, step=int(step),
                                                              synchronous=True))

    def log_dataset(self, run_id: str, *, name: str, digest: str, source: str, context: str) -> None:
        """A run input (the UI's Datasets column): what was trained on or evaluated against, by name and digest;
        `context` is MLflow's "training", "evaluation", ... Logging the same dataset again is a no-op."""
        source_type = source.split("://", 1)[0] if "://" in source else "local"
        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps({"uri": source}))
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        self._call("log input", lambda: self.client.log_inputs(run_id, [entry]))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """A text artifact, redacted."""
        self._call("log artifact", lambda: self.client.log_text(run_id, redact(text), artifact_file))

    # --- reading runs back (reports) ------------------------------------------------------------------------
    def search_runs(self, filter_string: str = "", *, experiment_ids: list[str] | None = None,
                    order_by: list[str] | None = None, max_results: int = 10_000) -> list:
        """Runs matching an MLflow filter string in `experiment_ids` (default: every active experiment)."""
        if experiment_ids is None:
            experiments = self._call("search experiments", lambda: self.client.search_experiments())
            experiment_ids = [e.experiment_id for e in experiments]
        if not experiment_ids:
            return []
        return list(self._call("search runs", lambda: self.client.search_runs(
            experiment_ids, filter_string=filter_string, order_by=order_by, max_results=max_results)))

    def get_experiment(self, experiment_id: str):
        return self._call("get experiment", lambda: self.client.get_experiment(experiment_id))

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Every file under `local_dir`, keeping its layout, below `artifact_path`."""
        self._call("log artifacts", lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path))

    def list_artifacts(self, run_id: str, path: str | None = None) -> list:
        return list(self._call("list artifacts", lambda: self.client.list_artifacts(run_id, path)))

    def download_artifact(self, run_id: str, path: str, dst_dir: str | os.PathLike) -> str:
        """The local path of artifact `path` of the run, downloaded into `dst_dir`."""
        return self._call("download artifact",
                          lambda: self.client.download_artifacts(run_id, path, str(dst_dir)))


def _get_run_or_none(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as err:  # noqa: BLE001
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower():
            return None
        raise


def _param_value(key: str, value: Any) -> str:
    if is_secret_name(key.rsplit(".", 1)[-1]) and value is not None:
        register_secret(str(value))
        return REDACTED
    return redact("null" if value is None else value)[:6000]


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def flat_params(config: dict[str, Any]) -> dict[str, Any]:
    """Nested config -> {'train.lr': ..., ...} with secret-named values redacted."""
    return {k: _param_value(k, v) for k, v in flatten(config).items()}


__all__ = ["Tracker", "TrackingUnavailable", "default_tracking_uri", "resolve_tracking_uri", "TRACKING_ENV",
           "local_artifact_root", "code_tags", "flat_params", "RUN_NAME_TAG", "PARENT_TAG", "PROGRESS_METRIC",
           "EVAL_PROTOCOL_TAG"]
