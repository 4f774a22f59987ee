"""Training outlives its services, in one process (the worker loop Ray runs, without Ray, which adds nothing to these
faults): a real `mlflow server` SIGKILLed mid-run and started again, moto's S3 server stopped and started again, a
run folder made read-only for a while and for too long. Each run ends with the weights of the uninterrupted
reference run (helpers.training.tiny_config, 12 steps) and every step's metrics logged exactly once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from dcdit.checkpoint import load_checkpoint, save_checkpoint
from dcdit_platform.config import build_config
from dcdit_platform.raycluster import free_port
from dcdit_platform.storage import open_storage
from dcdit_platform.tracking import Tracker
from dcdit_platform.training import RunFailed, plan_run, run_local
from dcdit_platform.training.upload import LeaseLost, staging_root, upload_checkpoint, write_lease
from helpers.services import MlflowProcess
from helpers.training import load_weights, max_abs_diff, steps_logged, tiny_config


class When(logging.Handler):
    """Calls `action()` the first time the training logger says something containing `text`, in the thread that
    logs it: a fault injected at an exact point of the run (the progress line of a step, a retry warning)."""

    def __init__(self, text: str, action):
        super().__init__()
        self.text, self.action, self.done = text, action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.done and self.text in record.getMessage():
            self.done = True
            self.action()


@contextlib.contextmanager
def when(*pairs):
    """`with when((text, action), ...):` every pair armed while inside; yields the handlers (`.done` tells)."""
    logger = logging.getLogger("dcdit.train")
    handlers = [When(text, action) for text, action in pairs]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield handlers
    finally:
        for handler in handlers:
            logger.removeHandler(handler)


def assert_reference(checkpoint: Path, summary: dict, reference_run, tracker: Tracker) -> None:
    """The run's final weights are the reference run's, and every step's metrics are logged exactly once."""
    model, ema = load_weights(checkpoint)
    model_ref, ema_ref = reference_run[2][12]
    assert max_abs_diff(model, model_ref) <= 1e-6 and max_abs_diff(ema, ema_ref) <= 1e-6
    assert steps_logged(tracker, summary["mlflow_run_id"]) == list(range(1, 13))


STEP_5 = "step 5/12"  # the progress line of step 5: between checkpoints 4 and 8
RETRYING = "retrying for up to"  # a checkpoint upload waits for storage


# --- MLflow ----------------------------------------------------------------------------------------------------------

def test_mlflow_killed_mid_run_training_goes_on_and_resume_logs_what_it_held(reference_run, tmp_path):
    server = MlflowProcess(tmp_path / "mlflow", free_port()).start()
    try:
        # retry_timeout_s=1: the driver gives the absent server one second at the end, then says what it kept.
        config = build_config(tiny_config(storage={"uri": str(tmp_path / "runs")},
                                          tracking={"uri": server.uri, "retry_timeout_s": 1}))
        with when((STEP_5, lambda: server.stop(signal.SIGKILL)), ("training goes on", lambda: None)) as events, \
                pytest.raises(RunFailed) as failed:
            run_local(plan_run(config, name="outage"))
        assert events[1].done  # the worker said it trains on, and it did
        message, summary = str(failed.value), failed.value.summary
        assert "reached step 12" in message and "dcdit resume outage" in message and "\n" not in message
        assert summary["status"] == "FAILED" and summary["step"] == 12
        final = tmp_path / "runs" / "outage" / "checkpoint_00000012"
        held = load_checkpoint(final).state["pending_metrics"]
        assert [r["step"] for r in held] == list(range(5, 13))  # from the step it died at, with their steps

        server.start()  # the same store: the run is still RUNNING there
        resumed = run_local(plan_run(config, name="outage"))
        tracker = Tracker(server.uri)
        run = tracker.get_run(resumed["mlflow_run_id"])
        assert resumed["status"] == "FINISHED" and run.info.status == "FINISHED"
        assert "logged from the final checkpoint" in run.data.tags["dcdit.tracking_outage"]
        assert_reference(final, resumed, reference_run, tracker)
        assert not staging_root(str(tmp_path / "runs" / "outage"), "outage").exists()
    finally:
        server.stop()


def test_a_brief_mlflow_outage_is_flushed_by_the_worker_as_soon_as_the_server_answers(tmp_path, monkeypatch):
    """The step logger itself, step by step: buffered on disk while the server is gone, flushed at the first step
    after it answers again, nothing logged twice, and the run tagged with what the outage held back."""
    from dcdit_platform.training import logger as step_logger

    monkeypatch.setattr(step_logger, "RETRY_START_S", 0.0)  # retry at the very next step (no waiting in a test)
    server = MlflowProcess(tmp_path / "mlflow", free_port()).start()
    try:
        config = build_config(tiny_config())
        tracker = Tracker(server.uri)
        run_id = tracker.open_run(experiment="outage", run_name="unit")
        log = step_logger.StepLogger(config, name="unit", run_id=run_id, tracking_uri=server.uri, rank=0,
                                     world_size=1, start=0, staging=tmp_path / "staging")
        log.connect()
        metrics = {"train/loss": 1.0, "optim/grad_norm": 0.5, "perf/images_per_s": 10.0}
        assert log.publish(1, {**metrics, "step": 1}, None, None) is None
        server.stop(signal.SIGKILL)
        for step in (2, 3):
            assert log.publish(step, {**metrics, "step": step}, None, None) is None  # no stop
        buffered = [json.loads(line) for line in (tmp_path / "staging" / step_logger.PENDING_FILE).read_text()
                    .splitlines()]
        assert [r["step"] for r in buffered] == [2, 3] and log.pending() == buffered
        server.start()
        assert log.publish(4, {**metrics, "step": 4}, None, None) is None
        assert steps_logged(tracker, run_id) == [1, 2, 3, 4] and not log.pending()
        assert tracker.get_run(run_id).data.tags["dcdit.tracking_outage"].startswith("steps 2-3 buffered")
    finally:
        server.stop()


# --- storage ---------------------------------------------------------------------------------------------------------

def test_s3_stopped_mid_run_the_checkpoint_waits_and_uploads_when_it_returns(reference_run, s3_server, tmp_path):
    uri = s3_server.uri("outage")
    config = build_config(tiny_config(storage={"uri": uri},
                                      tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    with when((STEP_5, s3_server.stop), (RETRYING, s3_server.start)) as events:
        summary = run_local(plan_run(config, name="s3"))
    assert all(e.done for e in events) and summary["status"] == "FINISHED" and summary["step"] == 12
    storage = open_storage(uri)
    (tmp_path / "final").mkdir()
    storage.download("s3/checkpoint_00000012", str(tmp_path / "final"))
    assert_reference(tmp_path / "final", summary, reference_run, Tracker(f"sqlite:///{tmp_path}/mlflow.db"))
    assert not staging_root(storage.join("s3"), "s3").exists()


class ReadOnly:
    """A folder made read-only and writable again: a read-only bind mount as root (root ignores permissions),
    else its mode."""

    def __init__(self, path: Path):
        self.path, self.mounted = path, False

    def on(self) -> None:
        if os.geteuid() == 0:
            subprocess.run(["mount", "--bind", str(self.path), str(self.path)], check=True)
            self.mounted = True
            subprocess.run(["mount", "-o", "remount,ro,bind", str(self.path)], check=True)
        else:
            self.path.chmod(0o555)

    def off(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)
            self.mounted = False
        elif os.geteuid() != 0:
            self.path.chmod(0o755)


def test_a_read_only_run_folder_for_a_while_delays_a_checkpoint_and_loses_nothing(reference_run, tmp_path):
    config = build_config(tiny_config(storage={"uri": str(tmp_path / "runs")}))
    folder = ReadOnly(tmp_path / "runs" / "ro")
    try:
        with when((STEP_5, folder.on), (RETRYING, folder.off)) as events:
            summary = run_local(plan_run(config, name="ro"))
    finally:
        folder.off()
    assert all(e.done for e in events) and summary["status"] == "FINISHED"
    assert_reference(Path(summary["checkpoint"]), summary, reference_run,
                     Tracker(f"sqlite:///{tmp_path}/runs/mlflow.db"))


def test_a_run_folder_read_only_for_too_long_stops_the_run_whole_and_resume_uploads_the_kept_checkpoint(
        reference_run, tmp_path):
    config = build_config(tiny_config(storage={"uri": str(tmp_path / "runs")}, checkpoint={"upload_timeout_s": 2}))
    run_dir = tmp_path / "runs" / "ro-long"
    staged = staging_root(str(run_dir), "ro-long") / "checkpoint_00000008"
    folder = ReadOnly(run_dir)
    try:
        with when((STEP_5, folder.on)), pytest.raises(RunFailed) as failed:
            run_local(plan_run(config, name="ro-long"))
    finally:
        folder.off()
    message = str(failed.value)
    assert "checkpoint_00000008 was not saved after retrying" in message and str(staged) in message
    assert failed.value.summary["status"] == "FAILED" and failed.value.summary["step"] == 4
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_00000004"]  # nothing half-written
    assert (staged / "MANIFEST.json").exists()  # kept where the message says

    with when(("after a storage failure", lambda: None)) as uploaded:
        resumed = run_local(plan_run(config, name="ro-long"))
    assert uploaded[0].done and resumed["status"] == "FINISHED"
    assert load_checkpoint(run_dir / "checkpoint_00000008").step == 8
    assert_reference(Path(resumed["checkpoint"]), resumed, reference_run,
                     Tracker(f"sqlite:///{tmp_path}/runs/mlflow.db"))
    assert not staged.parent.exists()


def test_workers_of_a_replaced_driver_write_nothing(tmp_path):
    """A second start of the run takes the lease: an upload carrying the first start's token writes no file."""
    run = open_storage(str(tmp_path / "runs")).child("leased")
    first = write_lease(run)
    staged = save_checkpoint(tmp_path / "staged" / "checkpoint_00000004", model_state={"w": torch.ones(2)},
                             state={"step": 4})
    upload_checkpoint(staged, run, "checkpoint_00000004", lease=first, timeout_s=0)
    assert run.exists("checkpoint_00000004/MANIFEST.json")
    write_lease(run)  # another driver starts the run
    with pytest.raises(LeaseLost, match="started again by another driver"):
        upload_checkpoint(staged, run, "checkpoint_00000008", lease=first, timeout_s=0)
    assert not run.exists("checkpoint_00000008")
