"""Faults of runs on a real local Ray cluster (DDP over gloo, 2 workers) with a real `mlflow server`: a diverging
run ends the command non-zero with a FAILED MLflow run and a summary saying so; a SIGKILLed driver's workers stop
within seconds, and the resume that follows skips a truncated latest checkpoint, says which one it resumes from,
loads exactly that one, loses no step's weights or metrics and leaves no staging behind. (A SIGKILLed worker is in
test_train_ray.py.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from dcdit_platform.cli import main as cli_main
from dcdit_platform.config import build_config
from dcdit_platform.tracking import Tracker
from dcdit_platform.training import plan_run, run_local
from dcdit_platform.training.upload import staging_root
from helpers.training import load_weights, max_abs_diff, steps_logged, tiny_config

pytestmark = pytest.mark.slow

STEPS = 24


def cli(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `dcdit ARGS` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(args)
    return rc, out.getvalue(), err.getvalue()


def config_file(tmp_path: Path, **sections) -> str:
    path = tmp_path / f"exp-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**sections)))
    return str(path)


def wait_for(condition, what: str, timeout_s: float = 600.0, poll_s: float = 0.05) -> None:
    """Poll until `condition()` holds; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def test_a_diverging_run_fails_the_command_and_the_mlflow_run(ray_cluster, mlflow_server, tmp_path,
                                                             fast_ray_polling):
    rc, out, err = cli(["train", config_file(tmp_path), "--name", "diverges", "-o", "train.lr=1e30",
                        "--storage", str(tmp_path / "runs"), "--tracking-uri", mlflow_server.uri, "--json"])
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2 and len(errors) == 1 and "non-finite" in errors[0], err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "FAILED" and "non-finite" in summary["error"]
    run = Tracker(mlflow_server.uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["dcdit.error"]


def marked_processes(mark: str) -> list[str]:
    """Titles of the live processes whose environment holds DCDIT_TEST_MARK=mark (a driver's whole Ray)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if f"DCDIT_TEST_MARK={mark}".encode() in environ.read_bytes().split(b"\0"):
                found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80])
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run straight through in one process: the weights every interrupted run must end with."""
    store = tmp_path_factory.mktemp("reference")
    config = build_config(tiny_config(storage={"uri": str(store)}, train={"steps": STEPS}))
    summary = run_local(plan_run(config, name="straight"))
    return load_weights(summary["checkpoint"])


def test_a_killed_driver_then_a_truncated_latest_checkpoint(ray_cluster, mlflow_server, reference, tmp_path,
                                                            fast_ray_polling):
    storage, name, mark = tmp_path / "runs", "killed", uuid.uuid4().hex
    run_dir = storage / name
    config = config_file(tmp_path, train={"steps": STEPS})
    common = ["--storage", str(storage), "--tracking-uri", mlflow_server.uri]
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:  # its own embedded Ray, so that killing it orphans the workers
        driver = subprocess.Popen([sys.executable, "-m", "dcdit_platform.cli", "train", config, "--name", name,
                                   *common], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "DCDIT_TEST_MARK": mark})
    try:
        wait_for(lambda: (run_dir / "checkpoint_00000008" / "MANIFEST.json").exists() or driver.poll() is not None,
                 "the driver's second checkpoint")
        assert driver.poll() is None, log.read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        wait_for(lambda: not any("RayTrainWorker" in p for p in marked_processes(mark)), "the orphaned workers to stop",
                 timeout_s=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_*") if (p / "MANIFEST.json").exists())
    # Before, orphans went on for 12 steps and 3 checkpoints; now at most the checkpoint in flight completes.
    newest = checkpoints[-1]
    assert newest in ("checkpoint_00000008", "checkpoint_00000012"), checkpoints
    model = run_dir / newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # the newest checkpoint is now truncated
    previous = checkpoints[-2]

    rc, out, err = cli(["resume", name, *common, "--json"])
    assert rc == 0, err[-3000:]
    assert f"warning: skipping {newest}" in err and "(truncated?)" in err
    assert f"resuming {name} from {previous} " in err
    summary = json.loads(out.strip().splitlines()[-1])
    tracker = Tracker(mlflow_server.uri)
    run = tracker.get_run(summary["mlflow_run_id"])
    assert run.data.tags["dcdit.resumed_from_step"] == str(int(previous.rsplit("_", 1)[1]))  # what it said
    assert summary["status"] == "FINISHED" and summary["step"] == STEPS and run.info.status == "FINISHED"
    assert steps_logged(tracker, summary["mlflow_run_id"]) == list(range(1, STEPS + 1))  # each step once
    model, ema = load_weights(summary["checkpoint"])
    assert max_abs_diff(model, reference[0]) <= 1e-6 and max_abs_diff(ema, reference[1]) <= 1e-6
    assert not staging_root(str(run_dir), name).exists()  # what the killed workers staged is gone
