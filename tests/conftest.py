"""Shared fixtures: real services started once per session (S3-compatible server, local Ray cluster).

Keep one section per service; fixtures that start something are session-scoped and cleaned up at the end.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field

import boto3
import moto.server
import pytest
import ray
import torch

from dcdit_platform.raycluster import free_port


# --- One intra-op thread (opt in with pytest.mark.usefixtures("one_thread")) -----------------------------------
@pytest.fixture
def one_thread():
    """torch on one thread for the test: faster for tiny models on a shared 2-core machine, and one summation
    order whatever the core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- The user cache (~/.cache/dcdit: domain classifiers, weight copies) in a folder of the session ------------
@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """XDG_CACHE_HOME of the session, set before any Ray starts so that workers and subprocesses inherit it."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield os.environ["XDG_CACHE_HOME"]
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


# --- S3: moto's threaded server on 127.0.0.1, spoken to over HTTP by s3fs/pyarrow/boto3 -----------------------
S3_BUCKET = "dcdit-test"
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict
    port: int = 0
    running: list = field(default_factory=list)  # the ThreadedMotoServer serving now, if any

    def uri(self, name: str = "") -> str:
        """A fresh s3:// prefix in the test bucket (unique per call, so tests never see each other's files)."""
        return f"s3://{self.bucket}/{name or 'x'}-{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        """Serve on the endpoint's port (again): moto keeps its buckets and objects in this process."""
        server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.running.append(server)

    def stop(self) -> None:
        """An outage: nothing answers on the endpoint until `start`."""
        while self.running:
            self.running.pop().stop()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the whole session, with one bucket; sets the AWS_* variables in os.environ.

    The variables are set process-wide (not per test) so that Ray workers started later inherit them.
    """
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's HTTP server logs every request otherwise
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    s3 = S3Server(endpoint=endpoint, bucket=S3_BUCKET, env=env, port=port)
    s3.start()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
    try:
        yield s3
    finally:
        s3.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- Ray: one local cluster per session ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray instance with 2 CPUs (started after the S3 server so workers inherit its AWS_* variables)."""
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level="warning")
    try:
        yield ray
    finally:
        ray.shutdown()
