"""Trained models in MLflow: `DCDiTPyfunc`, the pyfunc flavour of a `dcdit export` directory (a DataFrame of class
labels and seeds in, one uint8 HWC image per row out, drawn by the code `dcdit sample` draws with), `log_model` (an
MLflow 3 LoggedModel linked to its run and the run's metrics) and `register` (a registered model version of it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from dcdit.errors import DCDiTError
from dcdit_platform import console
from dcdit_platform.sampling import (EXPORT_ARTIFACT, Drawer, SampleRequest, check_pairs, export,
                                     load_drawer, resolve, sampling_plan)
from dcdit_platform.secrets import REDACTED, redact
from dcdit_platform.tracking import Tracker, TrackingUnavailable, resolve_tracking_uri

MODEL_NAME = "model"  # the LoggedModel's name (MLflow 3 lists a run's models by it)
MODEL_TYPE = "dcdit"
STEP_TAG, CHECKPOINT_TAG = "dcdit.step", "dcdit.checkpoint"
REGISTER_TIMEOUT_S = 30.0  # how long `dcdit register` retries an unreachable tracking server
# The optional predict() params: None takes the export's default (as `dcdit sample` without the flag).
PARAMS = ParamSchema([ParamSpec("sampler", "string", None), ParamSpec("steps", "long", None),
                      ParamSpec("cfg_scale", "double", None), ParamSpec("lite_cfg", "boolean", False),
                      ParamSpec("tail_drop", "double", None), ParamSpec("batch_size", "long", 16)])
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("long", "class"), ColSpec("long", "seed", required=False)]),
                           outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]), params=PARAMS)

# MLflow's "models from code": loading runs this file, which names the class by import (nothing is pickled).
MODEL_CODE = """import mlflow.models
from dcdit_platform.mlflow_model import DCDiTPyfunc

mlflow.models.set_model(DCDiTPyfunc())
"""


class DCDiTPyfunc(mlflow.pyfunc.PythonModel):
    """`predict(DataFrame[class, seed])` -> uint8 array (rows, H, W, C): row i is the image `dcdit sample --class
    C --seed S` writes for that row's class and seed (seed 0 when the column is absent) under the same settings."""

    def load_context(self, context) -> None:
        self.drawer: Drawer = load_drawer(resolve(context.artifacts[EXPORT_ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "class" not in frame.columns:
            raise DCDiTError(f"the input needs a 'class' column (and optionally 'seed'); got {list(frame.columns)}")
        seeds = frame["seed"] if "seed" in frame.columns else [0] * len(frame)
        pairs = [(int(c), int(s)) for c, s in zip(frame["class"], seeds, strict=True)]
        p = {k: v for k, v in (params or {}).items() if v is not None}
        request = SampleRequest(classes=[], sampler=p.get("sampler"), steps=p.get("steps"),
                                cfg_scale=p.get("cfg_scale"), lite_cfg=bool(p.get("lite_cfg", False)),
                                tail_drop=p.get("tail_drop"))
        plan = sampling_plan(self.drawer.src, request)
        check_pairs(self.drawer.src, pairs)
        batch = int(p.get("batch_size", 16))
        return np.concatenate([pixels for _, pixels, _ in self.drawer.draw(plan, pairs, max(batch, 1))])


def requirements() -> list[str]:
    """Pinned from this environment, so that MLflow does not infer them (it would import and inspect the model)."""
    names = ("dcdit", "torch", "numpy", "safetensors", "mlflow", "pandas", "pillow")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


@dataclass(frozen=True)
class LoggedModel:
    model_id: str
    uri: str  # models:/m-...
    step: int | None


def log_model(tracker: Tracker, checkpoint: str, *, experiment_id: str, run_id: str | None) -> LoggedModel:
    """Log the EMA weights of `checkpoint` (a checkpoint or run directory) as a pyfunc LoggedModel whose artifact
    is its `dcdit export` directory, linked to `run_id` (when given: the run's output at the checkpoint's step,
    with the run's params and its metrics)."""
    client = tracker.client
    with tempfile.TemporaryDirectory(prefix="dcdit-mlflow-model-") as tmp:
        summary = export(checkpoint, os.path.join(tmp, EXPORT_ARTIFACT))
        step = summary.get("step")
        params = dict(tracker.get_run(run_id).data.params) if run_id else {}
        tags = {CHECKPOINT_TAG: summary["source"], **({STEP_TAG: str(step)} if step is not None else {}),
                "dcdit.arch": summary["arch"]}
        model = tracker.call("create logged model", lambda: client.create_logged_model(
            experiment_id, name=MODEL_NAME, source_run_id=run_id, tags=tags, params=params, model_type=MODEL_TYPE))
        try:
            _upload(tracker, model, run_id, summary["out"], Path(tmp))
            if run_id:
                output = LoggedModelOutput(model.model_id, step=int(step or 0))
                tracker.call("link model to run", lambda: client.log_outputs(run_id, [output]))
                link_metrics(tracker, run_id, model.model_id)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: a half-logged model says so instead of PENDING
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
    tracker.call("finalize logged model", lambda: client.finalize_logged_model(model.model_id,
                                                                               LoggedModelStatus.READY))
    return LoggedModel(model.model_id, f"models:/{model.model_id}", step)


def _upload(tracker: Tracker, model, run_id: str | None, export_dir: str, tmp: Path) -> None:
    """The pyfunc model directory (MLmodel naming the LoggedModel, the code file, the export as an artifact, pinned
    requirements, the signature) written locally, then uploaded as the LoggedModel's artifacts."""
    local, code = tmp / "model", tmp / "dcdit_model.py"
    code.write_text(MODEL_CODE)
    with warnings.catch_warnings():  # the signature says what an input example would
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        mlflow.pyfunc.save_model(
            str(local), python_model=str(code), artifacts={EXPORT_ARTIFACT: export_dir},
            pip_requirements=requirements(), signature=SIGNATURE,
            mlflow_model=Model(artifact_path=model.artifact_location, run_id=run_id, model_uuid=model.model_id,
                               model_id=model.model_id))
    tracker.call("log model artifacts", lambda: tracker.client.log_model_artifacts(model.model_id, str(local)))


def link_metrics(tracker: Tracker, run_id: str, model_id: str) -> int:
    """Log the run's latest value of each metric (training's and, once run, evaluation's) against the model too,
    so that the model's page shows them; returns how many were linked now (those not linked yet)."""
    client = tracker.client
    run = tracker.get_run(run_id)
    linked = {(m.key, m.step) for m in tracker.call("get logged model",
                                                    lambda: client.get_logged_model(model_id)).metrics or []}
    latest = []
    for key in run.data.metrics:
        history = tracker.metric_history(run_id, key)
        if not history:
            continue
        last = max(history, key=lambda m: (m.step, m.timestamp))
        if (key, last.step) not in linked:
            latest.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id, run_id=run_id,
                                 dataset_name=last.dataset_name, dataset_digest=last.dataset_digest))
    for i in range(0, len(latest), 1000):
        chunk = latest[i:i + 1000]
        tracker.call("link metrics to model", lambda chunk=chunk: client.log_batch(run_id, metrics=chunk))
    return len(latest)


def run_model(tracker: Tracker, run_id: str, step: int | None) -> str | None:
    """The id of the run's READY logged model of the checkpoint at `step` (the newest), or None."""
    run = tracker.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs and run.outputs.model_outputs else []
    for output in sorted(outputs, key=lambda o: o.step, reverse=True):
        model = tracker.call("get logged model", lambda o=output: tracker.client.get_logged_model(o.model_id))
        if model.status == LoggedModelStatus.READY and (step is None or model.tags.get(STEP_TAG) == str(step)):
            return model.model_id
    return None


def log_final_model(tracker: Tracker, run_id: str, checkpoint: str, step: int,
                    echo: Callable[[str], None]) -> str | None:
    """At the end of a training run: its final checkpoint's EMA weights as the run's logged model (once: a run
    resumed after its end keeps the model it has). Best effort, as the run's result is its checkpoint: a failure
    is a warning, and `dcdit register` logs the model later."""
    try:
        experiment_id = tracker.get_run(run_id).info.experiment_id
        if run_model(tracker, run_id, step) is not None:
            return None
        logged = log_model(tracker, checkpoint, experiment_id=experiment_id, run_id=run_id)
    except Exception as err:  # noqa: BLE001 - whatever fails here, the trained run stands and says so
        detail = " ".join(redact(err).split())[:300] or type(err).__name__
        console.warn("train", f"the final EMA weights were not logged as an MLflow model ({detail}); "
                              f"`dcdit register {checkpoint} --name NAME` logs and registers them")
        return None
    echo(f"logged the final EMA weights as MLflow model {logged.uri}")
    return logged.uri


def register(ref: str, name: str, *, tracking_uri: str | None = None, storage: str | None = None) -> dict:
    """Register the logged model of CHECKPOINT_OR_RUN's checkpoint (logging one first when its run has none) as a
    new version of registered model `name`; the summary's "uri" is models:/NAME/VERSION."""
    src = resolve(ref, storage)
    checkpoint = src.info.get("checkpoint")
    if checkpoint is None or checkpoint != src.uri:  # an export (or models:/) names the checkpoint it came from
        raise DCDiTError(f"{ref} is not a checkpoint or run: `dcdit register` takes a checkpoint or run directory, "
                         "or a run name with --storage")
    # The rule of `dcdit train`: the flag, else the run's tracking.uri (unless it held a password, which the
    # checkpoint keeps redacted), else $MLFLOW_TRACKING_URI, else the SQLite store in the run's storage.
    trained_with = src.info.get("tracking_uri")
    explicit = tracking_uri or (trained_with if trained_with and REDACTED not in trained_with else None)
    uri = resolve_tracking_uri(explicit, checkpoint.rstrip("/").rsplit("/", 2)[0], create=False)
    tracker = Tracker(uri, retry_timeout_s=REGISTER_TIMEOUT_S)
    run_id, step = src.info.get("mlflow_run_id"), src.info.get("step")
    if run_id:
        try:
            experiment_id = tracker.get_run(run_id).info.experiment_id
        except TrackingUnavailable:
            raise
        except DCDiTError:
            raise DCDiTError(f"the checkpoint belongs to MLflow run {run_id}, which {tracker.display_uri} does not "
                             "know; pass the --tracking-uri (or MLFLOW_TRACKING_URI) it was trained with") from None
    else:
        experiment_id = tracker.experiment_id(src.info.get("experiment") or "dcdit")
    model_id = run_model(tracker, run_id, step) if run_id else None
    logged_now = model_id is None
    if logged_now:
        model_id = log_model(tracker, checkpoint, experiment_id=experiment_id, run_id=run_id).model_id
    elif run_id:
        link_metrics(tracker, run_id, model_id)  # evaluation metrics logged since training ended
    client = tracker.client
    # The source is the model's artifact location, not models:/m-ID: a SQLite store resolves that URI through the
    # process-wide tracking URI, not this client's.
    location = tracker.call("get logged model", lambda: client.get_logged_model(model_id)).artifact_location
    tracker.call("create registered model", lambda: _ensure_registered(client, name))
    version = tracker.call("create model version", lambda: client.create_model_version(
        name, source=location, run_id=run_id, model_id=model_id,
        tags={CHECKPOINT_TAG: checkpoint, **({STEP_TAG: step} if step is not None else {})}))
    return {"uri": f"models:/{name}/{version.version}", "name": name, "version": int(version.version),
            "model_id": model_id, "model_uri": f"models:/{model_id}", "run_id": run_id, "checkpoint": checkpoint,
            "step": step, "logged_now": logged_now, "tracking_uri": tracker.display_uri}


def _ensure_registered(client, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


__all__ = ["DCDiTPyfunc", "LoggedModel", "SIGNATURE", "link_metrics", "log_final_model", "log_model", "register",
           "requirements", "run_model"]
