"""`dcdit eval --address` on a `ray start --head` cluster whose processes hold no credentials: its actors read the
reference dataset from S3 (moto) with the credentials the driver sends them by object reference, and none of the
secret values appears in `ray list jobs --detail`, Ray's jobs API, the cluster's session logs, MLflow or storage.
(They used to travel in the job's runtime_env, which all three of Ray's views show in plain text.)"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from dcdit.data import SyntheticDataset, write_dataset
from dcdit.features import DomainClassifier
from dcdit_platform.storage import open_storage
from dcdit_platform.tracking import Tracker, default_tracking_uri
from helpers.evaluation import tiny_checkpoint
from helpers.services import RayHead

pytestmark = pytest.mark.slow

CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
               "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")


def test_eval_on_a_cluster_sends_credentials_by_reference_and_shows_them_nowhere(tmp_path, s3_server):
    secrets = {"AWS_SECRET_ACCESS_KEY": f"s3-secret-{uuid.uuid4().hex}",
               "MLFLOW_TRACKING_TOKEN": f"mlflow-token-{uuid.uuid4().hex}"}
    reference = s3_server.uri("reference")
    storage = open_storage(reference)
    write_dataset(storage.root, SyntheticDataset(16, image_size=8, num_classes=4, seed=1), shard_size=8,
                  filesystem=storage.filesystem)
    runs = tmp_path / "runs"
    tracker = Tracker(default_tracking_uri(str(runs)))
    run_id = tracker.open_run(experiment="eval-secrets", run_name="tiny")
    checkpoint = tiny_checkpoint(runs, mlflow_run_id=run_id)
    classifier = DomainClassifier(num_classes=4, image_size=8).save(tmp_path / "classifier.safetensors")

    clean = {k: v for k, v in __import__("os").environ.items() if k not in CREDENTIALS and k != "RAY_ADDRESS"}
    head = RayHead(tmp_path / "ray-head.log", clean).start()  # no credentials anywhere on the cluster
    try:
        driver_env = {**head.env, **s3_server.env, **secrets}
        done = subprocess.run(
            [sys.executable, "-m", "dcdit_platform.cli", "eval", str(checkpoint), "--address", head.gcs_address,
             "--reference", reference, "--extractor", "dcdit-synthetic-classifier", "--weights", str(classifier),
             "--num-samples", "8", "--batch-size", "4", "--shard-size", "4", "--reference-samples", "16",
             "--pr-reference-samples", "0", "--metrics", "fid", "--workers", "1", "--sample-steps", "2", "--json"],
            capture_output=True, text=True, env=driver_env, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["fd"] >= 0 and summary["reference"] == reference  # the actors read S3

        listed = head.ray("list", "jobs", "--detail", "--address", head.address, timeout=120)
        assert listed.returncode == 0 and "DRIVER" in listed.stdout, listed.stderr[-2000:]  # our driver's job
        views = [done.stdout, done.stderr, listed.stdout]
        for api in ("/api/jobs/", "/api/v0/jobs?detail=1"):  # the jobs API and the State API behind `ray list`
            request = urllib.request.Request(f"{head.address}{api}",
                                             headers={"Authorization": f"Bearer {head.token}"})
            views.append(urllib.request.urlopen(request, timeout=30).read().decode())
        logs = [p for p in Path(head.temp_dir).rglob("*") if p.is_file() and p.stat().st_size < 50 << 20]
        assert any(p.name.startswith("runtime_env_agent") for p in logs)  # the logs the issue saw the secrets in
        contents = {str(p): p.read_bytes() for p in logs}
    finally:
        head.stop()
    run = tracker.get_run(run_id)
    views += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(run.data.metrics)]
    artifacts = Path(tracker.download_artifact(run_id, "", tmp_path / "artifacts"))
    files = [p for p in artifacts.rglob("*") if p.is_file()] + [p for p in runs.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files)  # the evaluation wrote its grid to storage and MLflow
    contents.update((str(p), p.read_bytes()) for p in files)
    for secret in secrets.values():
        assert not any(secret in view for view in views), secret
        assert not [name for name, data in contents.items() if secret.encode() in data], secret
