"""A training worker's view of what runs it (`Session`): its rank, device and secrets, which start of the worker
group this is, the checkpoint to resume from, where reports and checkpoints go, and whether its driver still
lives. `RaySession` is Ray Train; `LocalSession` is one in-process worker with the same checkpoint semantics
(tests and debugging). Both upload checkpoints the same way (training/upload.py) to the run folder on storage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ContextManager, Protocol

import ray
import ray.train
import ray.train.torch
import torch

from dcdit.checkpoint import CHECKPOINT_DIR
from dcdit_platform.runs import checkpoint_name
from dcdit_platform.storage import open_storage
from dcdit_platform.training.payload import WorkerPayload, WorkerSecrets
from dcdit_platform.training.upload import staging_root, upload_checkpoint

_log = logging.getLogger("dcdit.train")
PING_EVERY_S = 1.0  # how often rank 0 asks whether its driver lives (a remote call of about a millisecond)
PING_TIMEOUT_S = 10.0


class Session(Protocol):
    rank: int
    world_size: int

    def device(self) -> torch.device | None:
        """The device assigned to this worker, if any (a GPU under Ray with use_gpu)."""

    def secrets(self, payload: WorkerPayload) -> WorkerSecrets:
        ...

    def attempt(self) -> int:
        """Rank 0: which start of the worker group this is (0 = the first; later ones follow a failure)."""

    def checkpoint(self, dirname: str) -> ContextManager[str]:
        """A local directory holding checkpoint `dirname` of the run."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int | None = None) -> None:
        """Hand over metrics, and at checkpoint steps upload the checkpoint rank 0 wrote to `checkpoint_dir`."""

    def finish(self, outcome: dict) -> None:
        """Rank 0: leave the run's outcome (the last metrics and step, or the error it stopped on) for the driver."""

    def stop_if_orphaned(self) -> None:
        """Rank 0: exit this process at once when the driver that started the worker group is gone (its peers fail
        at their next collective): an orphan must not train or write on."""


class _Storage:
    """The run folder, the staging folder and the upload settings a session writes checkpoints with."""

    def __init__(self, payload: WorkerPayload, secrets: WorkerSecrets, timeout_s: float):
        self.run = open_storage(payload.storage_uri, secrets.storage_options or None).child(payload.name)
        self.staging = staging_root(self.run.uri, payload.name)
        self.lease, self.timeout_s = payload.lease, timeout_s

    def upload(self, local: str, dirname: str) -> None:
        upload_checkpoint(Path(local), self.run, dirname, lease=self.lease, timeout_s=self.timeout_s,
                          warn=lambda text: _log.warning("%s", text))

    @contextlib.contextmanager
    def local_copy(self, dirname: str) -> Iterator[str]:
        if self.run.is_local:
            yield self.run.path(dirname)
            return
        self.staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="resume-", dir=self.staging) as tmp:
            self.run.download(dirname, tmp)
            yield tmp


class _WritesCheckpoints:
    """What both sessions share: the run folder on storage and this machine's staging folder of the run."""

    _storage: _Storage

    @property
    def staging(self) -> Path:
        return self._storage.staging

    @property
    def run_storage(self):
        return self._storage.run


class RaySession(_WritesCheckpoints):
    """The worker's view of Ray Train."""

    def __init__(self, payload: WorkerPayload, upload_timeout_s: float):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.payload, self.upload_timeout_s = payload, upload_timeout_s
        self._storage: _Storage | None = None
        self._pinged = 0.0

    def device(self) -> torch.device | None:
        try:
            return ray.train.torch.get_device()
        except Exception:  # noqa: BLE001 - no GPU assigned
            return None

    def secrets(self, payload: WorkerPayload) -> WorkerSecrets:
        secrets = ray.get(payload.secrets) if payload.secrets is not None else WorkerSecrets()
        self._storage = _Storage(payload, secrets, self.upload_timeout_s)
        return secrets

    def attempt(self) -> int:
        return ray.get(self.payload.outcome.start.remote()) if self.payload.outcome is not None else 0

    def checkpoint(self, dirname: str) -> ContextManager[str]:
        return self._storage.local_copy(dirname)

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int | None = None) -> None:
        # Every rank passes the same name at a checkpoint step; only rank 0 has files, and uploads them itself.
        kwargs = {"checkpoint_dir_name": checkpoint_name(step)} if step is not None else {}
        checkpoint = None
        if checkpoint_dir:
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            kwargs["checkpoint_upload_fn"] = self._upload
        ray.train.report(metrics, checkpoint=checkpoint, **kwargs)

    def _upload(self, checkpoint: ray.train.Checkpoint, dirname: str) -> ray.train.Checkpoint:
        self.stop_if_orphaned()
        self._storage.upload(checkpoint.path, dirname)
        storage = ray.train.get_context().get_storage()
        return ray.train.Checkpoint(path=storage.build_checkpoint_path_from_name(dirname),
                                    filesystem=storage.storage_filesystem)

    def finish(self, outcome: dict) -> None:
        if self.payload.outcome is not None:
            ray.get(self.payload.outcome.finish.remote(outcome))

    def stop_if_orphaned(self) -> None:
        if not self._driver_alive():
            _log.warning("[%s] the driver is gone: this worker stops without writing", self.payload.name)
            os._exit(3)  # nothing waits for an orphan; its peers fail at their next collective

    def _driver_alive(self) -> bool:
        """On the driver's host its pid tells at once (Ray takes seconds to tear a dead driver's actors down);
        elsewhere the driver's OutcomeBox answers, or not, at most once a second."""
        host, pid = self.payload.driver or ("", 0)
        if host == socket.gethostname() and not _pid_alive(pid):
            return False
        if self.payload.outcome is None or time.monotonic() - self._pinged < PING_EVERY_S:
            return True
        try:
            ray.get(self.payload.outcome.ping.remote(), timeout=PING_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False
        self._pinged = time.monotonic()
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class LocalSession(_WritesCheckpoints):
    """One in-process worker with Ray Train's checkpoint semantics (tests, debugging): checkpoints are uploaded to
    the run folder the same way, the newest `keep` kept."""

    rank, world_size = 0, 1

    def __init__(self, payload: WorkerPayload, *, keep: int = 3, secrets: WorkerSecrets | None = None,
                 upload_timeout_s: float = 600.0, resume_from: str | None = None):
        self._secrets = secrets or WorkerSecrets()
        self._storage = _Storage(payload, self._secrets, upload_timeout_s)
        self.keep = keep
        self.resume_from = resume_from  # hand back this checkpoint instead of the driver's (as Ray may)
        self.reports: list[dict] = []
        self.outcome: dict | None = None

    def device(self) -> None:
        return None

    def secrets(self, payload: WorkerPayload) -> WorkerSecrets:
        return self._secrets

    def attempt(self) -> int:
        return 0

    def checkpoint(self, dirname: str) -> ContextManager[str]:
        return self._storage.local_copy(self.resume_from or dirname)

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        self._storage.upload(checkpoint_dir, checkpoint_name(step))
        run = self._storage.run
        kept = sorted(p for p in run.listdir() if CHECKPOINT_DIR.fullmatch(p))
        for old in kept[:-self.keep]:
            run.delete(old)

    def finish(self, outcome: dict) -> None:
        self.outcome = dict(outcome)

    def stop_if_orphaned(self) -> None:
        """One process: the driver is this process."""


__all__ = ["Session", "RaySession", "LocalSession"]
