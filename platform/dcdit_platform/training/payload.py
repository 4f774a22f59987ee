"""What the driver sends each training worker: `WorkerPayload` (the run's redacted config and identity, and where
its checkpoints and outcome go) and `WorkerSecrets` (credentials, secrets.py), which travels as a Ray object
reference so that it stays out of what Ray exports to its dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dcdit_platform.secrets import WorkerSecrets


@dataclass(frozen=True)
class WorkerPayload:
    """One run as every worker of it receives it."""

    config: dict  # the redacted config tree (checkpoints store it as config.json)
    name: str  # the run name
    run_id: str  # the MLflow run, unless the checkpoint a worker resumes from names one
    config_hash: str  # of the science: a checkpoint of another hash is refused
    tracking_uri: str  # redacted: used when the secrets hold none
    storage_uri: str = ""  # the storage root (credentials travel in the secrets' storage options)
    lease: str = ""  # this driver's claim on the run: a worker writes nothing once another driver holds it
    resume_from: str | None = None  # the checkpoint the driver verified and named; None: a fresh start
    secrets: Any = None  # a Ray ObjectRef to WorkerSecrets (None in one process, whose session holds them)
    outcome: Any = None  # the driver's OutcomeBox actor (Ray only)
    driver: tuple[str, int] | None = None  # (host, pid) of the driver process: workers on its host watch the pid


__all__ = ["WorkerPayload", "WorkerSecrets"]
