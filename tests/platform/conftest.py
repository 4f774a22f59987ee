"""Platform fixtures: a real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts), started once per
session and waited on until healthy, and faster Ray Train polling. The Ray cluster and the S3 server come from
tests/conftest.py; fixtures of one package's tests live in its folder's conftest.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from dcdit_platform.raycluster import free_port
from helpers.services import MlflowProcess


@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    port: int
    root: Path

    def uri_with_credentials(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` as a subprocess (its own process group, stopped at the end of the session)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowProcess(root, free_port())
    try:
        server.start()
        yield MlflowServer(uri=server.uri, port=server.port, root=root)
    finally:
        server.stop()


@pytest.fixture
def fast_ray_polling(monkeypatch):
    """Ray Train's controller drains reports every 2 s by default; the driver propagates this to the controller."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
