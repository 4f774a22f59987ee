"""What a training worker tells MLflow (rank 0 only): its start, step metrics with a progress line, artifacts,
and the error it stopped on. Training outlives the tracking server: metrics go through a buffer on local disk
(with their steps), flushed as soon as the server answers, carried in every checkpoint until then, and the run is
tagged with the steps an outage held back. Steps MLflow already holds are not logged again (a resumed run repeats
steps); only an error that waiting cannot fix (a refused request) stops the run, on every rank at the same step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.nn as nn

from dcdit.errors import DCDiTError
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.console import format_duration
from dcdit_platform.tracking import Tracker, TrackingUnavailable
from dcdit_platform.training.artifacts import write_artifacts
from dcdit_platform.training.runtime import Runtime

# A logger, not print: Ray Train patches print into its logger and can echo it twice.
_progress = logging.getLogger("dcdit.train")

SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's monitor samples CPU, memory, disk, network (and GPU) this often
CALL_BUDGET_S = 5.0  # how long one logging call retries before its metrics wait in the buffer
RETRY_START_S = 2.0  # the first pause between two flush attempts during an outage, doubled after each failure
RETRY_MAX_S = 60.0  # the longest pause
PENDING_FILE = "metrics-pending.jsonl"


class MetricBuffer:
    """Step metrics MLflow has not acknowledged yet, in memory and appended to a JSON-lines file on local disk."""

    def __init__(self, path: Path, carried: list[dict] | None = None):
        self.path = path
        self.records: list[dict] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a previous start's file: its steps are in the checkpoint or trained again
        for record in carried or []:
            self.add(int(record["step"]), record["metrics"])

    def add(self, step: int, metrics: dict) -> None:
        record = {"step": step, "metrics": metrics}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def drop_until(self, step: int) -> None:
        """Forget the records of steps MLflow already holds."""
        self.records = [r for r in self.records if r["step"] > step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def __len__(self) -> int:
        return len(self.records)


class StepLogger:
    """Rank 0's MLflow client for one run; on other ranks it only takes part in agreeing to stop."""

    def __init__(self, config: ExperimentConfig, *, name: str, run_id: str, tracking_uri: str, rank: int,
                 world_size: int, start: int, staging: Path, carried: list[dict] | None = None):
        self.config, self.name, self.run_id, self.world_size = config, name, run_id, world_size
        self.tracker: Tracker | None = None
        self.buffer: MetricBuffer | None = None
        self.logged_until = start  # steps up to the checkpoint resumed from are in MLflow or in `carried`
        self.known = False  # whether logged_until came from MLflow itself
        self.retry_at, self.delay = 0.0, RETRY_START_S
        self.outage: list[int] = []  # first and last step held back by the current outage
        if rank == 0:
            self.tracker = Tracker(tracking_uri, retry_timeout_s=min(CALL_BUDGET_S, config.tracking.retry_timeout_s))
            self.buffer = MetricBuffer(staging / PENDING_FILE, carried)
        self.start = start
        self.tracking_uri = tracking_uri
        self.monitor = None

    def connect(self) -> None:
        """Rank 0: learn which steps MLflow holds and tag this start (later, when the server is away now), and
        start MLflow's system metrics monitor."""
        if self.tracker is not None:
            self._connect()
            if self.known:  # not during an outage: the monitor's first request would wait for the server
                self.monitor = start_system_metrics(self.run_id, self.tracking_uri, self.name)

    def close(self) -> None:
        """Stop the system metrics monitor and log what it sampled since its last publication (its loop publishes
        after a whole interval: a run shorter than that would otherwise have no system metrics at all)."""
        if self.monitor is not None:
            with contextlib.suppress(Exception):  # noqa: BLE001 - best effort: the server may be what failed
                self.monitor.finish()
                if samples := self.monitor.aggregate_metrics():
                    self.monitor.publish_metrics(samples)
                    self.monitor.mlflow_logger.flush()
            self.monitor = None

    def _connect(self) -> None:
        """Learn what MLflow holds and tag this start; during an outage, only remember to do so."""
        try:
            server = self.tracker.last_logged_step(self.run_id)
            self.known = True
            self.buffer.drop_until(server)  # steps a previous start logged after the checkpoint it carried
            self.logged_until = max(self.logged_until, server)
            # How often a worker group started this run: > 1 means a restart after a failure (or a resume).
            starts = int(self.tracker.get_run(self.run_id).data.tags.get("dcdit.worker_starts", "0")) + 1
            self.tracker.set_tags(self.run_id, {"dcdit.worker_starts": starts,
                                                "dcdit.resumed_from_step": self.start})
        except TrackingUnavailable as err:
            self._unavailable(err, self.start)

    def pending(self) -> list[dict]:
        """The buffered records: what a checkpoint carries so that no logged step is lost with this worker."""
        return list(self.buffer.records) if self.buffer is not None else []

    def publish(self, step: int, metrics: dict | None, ema: nn.Module | None, runtime: Runtime) -> str | None:
        """Buffer `metrics` (when given) and flush the buffer when the server may answer; draw artifacts from `ema`
        (when given) unless the server is away. Returns why the run must stop (MLflow refused a request), the
        same on every rank, or None."""
        fatal = None
        if self.tracker is not None:
            try:
                if metrics is not None and step > self.logged_until:
                    self.buffer.add(step, {k: v for k, v in metrics.items() if k != "step"})
                    _log_progress(self.name, step, self.config.train.steps, metrics)
                self._flush(step)
                if ema is not None and not self.outage:
                    self._artifacts(step, ema, runtime)
            except DCDiTError as err:  # not TrackingUnavailable: a request MLflow refuses, so waiting cannot help
                fatal = f"{err}; stopped at step {step}"
        if self.world_size > 1:
            holder = [fatal]
            dist.broadcast_object_list(holder, src=0)
            fatal = holder[0]
        return fatal

    def _flush(self, step: int) -> None:
        if not len(self.buffer) or time.monotonic() < self.retry_at:
            return
        try:
            if not self.known:
                self._connect()
                if not self.known:
                    return
            self.tracker.log_metric_records(self.run_id, self.buffer.records)
        except TrackingUnavailable as err:
            self._unavailable(err, step)
            return
        self.logged_until = max(self.logged_until, max(r["step"] for r in self.buffer.records))
        self.buffer.drop_until(self.logged_until)
        if self.outage:
            held = f"steps {self.outage[0]}-{self.outage[1]}"
            _progress.warning("[%s] MLflow is back: %s were buffered and are logged now", self.name, held)
            with contextlib.suppress(TrackingUnavailable):
                self.tracker.set_tags(self.run_id, {"dcdit.tracking_outage": f"{held} buffered on the worker and "
                                                                               f"logged at step {step}"})
            self.outage, self.delay = [], RETRY_START_S

    def _unavailable(self, err: TrackingUnavailable, step: int) -> None:
        if not self.outage:
            _progress.warning("[%s] %s; training goes on and step metrics wait in %s", self.name, err,
                              self.buffer.path)
            self.outage = [step, step]
        self.outage[1] = step
        self.retry_at = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, RETRY_MAX_S)

    def _artifacts(self, step: int, ema: nn.Module, runtime: Runtime) -> None:
        with tempfile.TemporaryDirectory(prefix="artifacts-", dir=self.buffer.path.parent) as tmp:
            try:
                for path in write_artifacts(ema, self.config, step, runtime, tmp):
                    self.tracker.log_artifact(self.run_id, path, "samples")
                    # Also as an image keyed by what it shows: the UI steps through a run's images by step.
                    self.tracker.log_image(self.run_id, path, Path(path).name.split("_step")[0], step)
            except TrackingUnavailable as err:
                _progress.warning("[%s] samples of step %d not logged: %s", self.name, step, err)

    def record_error(self, message: str) -> None:
        """Best effort: the server may be what failed."""
        if self.tracker is None:
            return
        with contextlib.suppress(DCDiTError):
            self.tracker.set_tags(self.run_id, {"dcdit.error": message})


def start_system_metrics(run_id: str, tracking_uri: str, name: str):
    """MLflow's SystemMetricsMonitor on this node (the run's system/<host>/... metrics, the UI's System metrics
    tab), unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is false; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides
    the interval. None when it cannot start (no psutil, or the server is away): training does not depend on it."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() in ("false", "0", "no"):
        return None
    # Its start/stop lines and a stopped run's warnings would reach the terminal on every start.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    try:  # imported here: it needs psutil, which an install may lack (then training goes on without it)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=True,
                                       node_id=socket.gethostname(), tracking_uri=tracking_uri)
        monitor.start()
    except Exception as err:  # noqa: BLE001 - ImportError without psutil, MlflowException during an outage
        _progress.warning("[%s] no system metrics: %s", name, " ".join(str(err).split())[:200])
        return None
    return monitor


def _log_progress(name: str, step: int, steps: int, metrics: dict) -> None:
    parts = [f"loss {metrics['train/loss']:.4f}"]
    if "router/compression_effective" in metrics:
        parts.append(f"compression {metrics['router/compression_effective']:.2f}")
    parts += [f"grad {metrics['optim/grad_norm']:.3f}", f"{metrics['perf/images_per_s']:.1f} img/s"]
    if step < steps and "perf/step_time_s" in metrics:  # the steps left at the last window's pace
        parts.append(f"ETA {format_duration((steps - step) * metrics['perf/step_time_s'])}")
    _progress.info("[%s] step %d/%d %s", name, step, steps, " ".join(parts))
