"""`dcdit train` / `dcdit resume` on a real local Ray cluster with 2 CPU workers (DDP over gloo), checkpoints on a
real S3-compatible server (moto), metrics on a real `mlflow server` over HTTP. One run is SIGKILLed mid-way and
recovers by itself, then resumes from the newest checkpoint on storage although Ray's own record lost it; both end
exactly where the same loop run in one process ends, never log a step twice, and leak no secret to MLflow or any
log.

Ray start-up and worker-group start dominate the cost (tens of seconds each on 2 shared cores), so the module
runs one Ray job in two parts and checks everything on it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from dcdit_platform.cli import main as cli_main
from dcdit_platform.storage import open_storage
from dcdit_platform.tracking import Tracker
from helpers.training import load_weights, max_abs_diff, steps_logged, tiny_config

pytestmark = pytest.mark.slow

SECRETS = {"uri_password": "pw-ray-7f3a9c", "config_token": "cfg-token-51d2e8", "env_token": "env-token-93b4c1"}
ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # the controller registers reports every 0.5 s (default 2)
       "DCDIT_TEST_API_TOKEN": SECRETS["env_token"]}


def _cli(args: list[str], out: dict) -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            out["rc"] = cli_main([*args, "--json"])
    except BaseException as err:  # noqa: BLE001 - reported by the test
        out["error"] = err
    out["output"] = stdout.getvalue() + stderr.getvalue()
    lines = stdout.getvalue().strip().splitlines()
    out["summary"] = json.loads(lines[-1]) if lines and out.get("rc") == 0 else None


def _tail(out: dict) -> str:
    """The end of a command's output, whole: pytest shortens a dict's repr in the middle, where the cause is."""
    return f"rc={out.get('rc')}\n" + str(out.get("output", ""))[-6000:]


def _registered(storage, checkpoint: str) -> bool:
    """Whether Ray Train's checkpoint manager has recorded `checkpoint` in its snapshot."""
    try:
        snapshot = storage.read_json("checkpoint_manager_snapshot.json")
    except Exception:  # noqa: BLE001 - not written yet, or caught mid-write
        return False
    return any(r.get("checkpoint_dir_name") == checkpoint for r in snapshot.get("checkpoint_results", []))


def _ray_train_workers(address: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=address,  # other Ray instances may run on the machine
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def _assert_same_weights_as_the_reference(ray_run: dict, reference_run, step: int) -> None:
    """The checkpoint of `step` on S3 holds the weights (model and EMA) the in-process reference run has there."""
    local = ray_run["tmp"] / f"step{step}"
    local.mkdir()
    ray_run["storage"].download(f"checkpoint_{step:08d}", str(local))
    model, ema = load_weights(local)
    model_ref, ema_ref = reference_run[2][step]
    assert max_abs_diff(model, model_ref) <= 1e-6 and max_abs_diff(ema, ema_ref) <= 1e-6


@pytest.fixture(scope="module")
def ray_run(ray_cluster, s3_server, mlflow_server, tmp_path_factory):
    """Part 1: `dcdit train` to step 8 on S3, one worker SIGKILLed after the first checkpoint."""
    tmp = tmp_path_factory.mktemp("ray-run")
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        config = tiny_config(tracking={"tags": {"api_token": SECRETS["config_token"], "purpose": "ray-test"}},
                             checkpoint={"every": 2, "keep": 2, "max_failures": 2})
        config_file = tmp / "exp.yaml"
        config_file.write_text(yaml.safe_dump(config))
        run_uri = s3_server.uri("runs")
        common = ["--storage", run_uri, "--tracking-uri",
                  mlflow_server.uri_with_credentials("alice", SECRETS["uri_password"]),
                  "--address", ray_cluster.get_runtime_context().gcs_address]
        storage = open_storage(f"{run_uri}/on-s3")

        first: dict = {}
        thread = threading.Thread(target=_cli, args=(["train", str(config_file), "--name", "on-s3",
                                                      "-o", "train.steps=8", *common], first), daemon=True)
        thread.start()
        pids: list[int] = []
        deadline = time.monotonic() + 400
        while thread.is_alive() and time.monotonic() < deadline:
            if len(pids) < 2:
                pids = _ray_train_workers(ray_cluster.get_runtime_context().gcs_address)
            elif _registered(storage, "checkpoint_00000002"):
                break
            time.sleep(0.02)
        assert len(pids) == 2 and thread.is_alive(), _tail(first)
        # Ray Train has registered the first checkpoint (its controller polls the workers every 0.5 s here; a
        # frozen worker could not be polled, so the kill comes without warning, mid-run).
        os.kill(pids[0], signal.SIGKILL)
        thread.join(timeout=600)
        assert not thread.is_alive() and first.get("rc") == 0, _tail(first)
        tracker = Tracker(mlflow_server.uri)
        run_id = first["summary"]["mlflow_run_id"]
        yield {"first": first, "common": common, "storage": storage, "run_uri": f"{run_uri}/on-s3",
               "tracker": tracker, "run_id": run_id, "after_first": tracker.get_run(run_id),
               "logged_after_first": steps_logged(tracker, run_id), "tmp": tmp}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_sigkilled_worker_is_restarted_from_the_latest_checkpoint(ray_run, reference_run):
    summary = ray_run["first"]["summary"]
    assert summary["step"] == 8 and summary["checkpoint"] == f"{ray_run['run_uri']}/checkpoint_00000008"
    assert summary["tracking_uri"].startswith("http://alice:***@127.0.0.1:")
    run = ray_run["after_first"]
    assert int(run.data.tags["dcdit.worker_starts"]) == 2  # Ray restarted the worker group by itself...
    assert run.data.tags["dcdit.resumed_from_step"] in ("2", "4", "6")  # ...from a registered checkpoint
    assert ray_run["logged_after_first"] == list(range(1, 9))  # re-run steps were not logged twice
    storage = ray_run["storage"]
    assert {"checkpoint_00000006", "checkpoint_00000008", "checkpoint_manager_snapshot.json",
            "dcdit_run.json"} <= set(storage.listdir())
    assert {"MANIFEST.json", "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"} <= \
        set(storage.listdir("checkpoint_00000008"))
    _assert_same_weights_as_the_reference(ray_run, reference_run, 8)


def test_resume_from_an_older_checkpoint_is_exact_and_leaks_no_secret(ray_run, reference_run, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    storage, tracker, run_id = ray_run["storage"], ray_run["tracker"], ray_run["run_id"]
    # Ray's own record can lag storage (a report in the last poll interval before a crash can go unregistered):
    # forget checkpoint 8 in Ray's snapshot, keep its files. The driver's verified pick decides, not Ray's record.
    snapshot = storage.read_json("checkpoint_manager_snapshot.json")
    kept = [r for r in snapshot["checkpoint_results"] if r["checkpoint_dir_name"] != "checkpoint_00000008"]
    snapshot.update(checkpoint_results=kept, latest_checkpoint_result=kept[-1],
                    checkpoint_report_indices=snapshot["checkpoint_report_indices"][:len(kept)])
    storage.write_bytes("checkpoint_manager_snapshot.json", json.dumps(snapshot).encode())

    second: dict = {}
    _cli(["resume", "on-s3", "-o", "train.steps=12", *ray_run["common"]], second)
    assert second.get("rc") == 0, second
    summary = second["summary"]
    assert summary["step"] == 12 and summary["mlflow_run_id"] == run_id
    assert summary["checkpoint"] == f"{ray_run['run_uri']}/checkpoint_00000012" and "train/loss" in summary["metrics"]
    _assert_same_weights_as_the_reference(ray_run, reference_run, 12)

    run = tracker.get_run(run_id)
    assert steps_logged(tracker, run_id) == list(range(1, 13))  # each step logged once
    assert run.info.status == "FINISHED" and run.data.tags["dcdit.resumed_from_step"] == "8"
    assert "resuming on-s3 from checkpoint_00000008 " in second["output"]  # the message names what was loaded
    assert run.data.params["train.steps"] == "8" and run.data.tags["dcdit.changed.train.steps"] == "12"
    # Each start that reached its end logged its final EMA weights as a model of the run (MLflow 3 LoggedModel).
    models = [tracker.client.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
    assert sorted(int(m.tags["dcdit.step"]) for m in models) == [8, 12]

    # No secret in params, tags, artifacts, the commands' output or any log of the Ray session.
    import ray

    artifacts = Path(tracker.client.download_artifacts(run_id, "", str(ray_run["tmp"] / "artifacts")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "resolved.yaml" for p in files) and any(p.suffix == ".png" for p in files)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files += [p for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50 << 20]
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), ray_run["first"]["output"], second["output"]]
    for secret in [*SECRETS.values(), os.environ["AWS_SECRET_ACCESS_KEY"]]:
        assert not any(secret in text for text in texts), secret
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, (secret, leaked)
    assert run.data.tags["api_token"] == "***" and run.data.params["tracking.tags.api_token"] == "***"
