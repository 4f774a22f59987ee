"""A training worker's view of what runs it (`Session`): its rank, device and secrets, the checkpoint to resume
from, and where reports and checkpoints go. `RaySession` is Ray Train; `LocalSession` is one in-process worker with
the same checkpoint semantics on a local folder (tests and debugging).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import ContextManager, Protocol

import ray
import ray.train
import ray.train.torch
import torch

from dcdit.checkpoint import CHECKPOINT_DIR, find_latest_checkpoint
from dcdit_platform.runs import checkpoint_name
from dcdit_platform.training.payload import WorkerPayload, WorkerSecrets


class Session(Protocol):
    rank: int
    world_size: int

    def device(self) -> torch.device | None:
        """The device assigned to this worker, if any (a GPU under Ray with use_gpu)."""

    def secrets(self, payload: WorkerPayload) -> WorkerSecrets:
        ...

    def checkpoint(self) -> ContextManager[str | None]:
        """A local directory holding the checkpoint to resume from, or None for a fresh start."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int | None = None) -> None:
        """Hand over metrics, and at checkpoint steps the checkpoint rank 0 wrote to `checkpoint_dir`."""


class RaySession:
    """The worker's view of Ray Train."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device | None:
        try:
            return ray.train.torch.get_device()
        except Exception:  # noqa: BLE001 - no GPU assigned
            return None

    def secrets(self, payload: WorkerPayload) -> WorkerSecrets:
        return ray.get(payload.secrets) if payload.secrets is not None else WorkerSecrets()

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as path:
            yield path

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int | None = None) -> None:
        # Every rank passes the same name at a checkpoint step; Ray takes rank 0's and only rank 0 has files.
        kwargs = {"checkpoint_dir_name": checkpoint_name(step)} if step is not None else {}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, **kwargs)


class LocalSession:
    """One in-process worker with Ray Train's checkpoint semantics on a local folder (tests, debugging)."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: str, keep: int = 3, secrets: WorkerSecrets | None = None,
                 resume_from: str | None = None):
        self.run_dir, self.keep, self._secrets = run_dir, keep, secrets or WorkerSecrets()
        self.resume_from = resume_from  # hand back this checkpoint instead of the newest (as Ray may)
        self.reports: list[dict] = []

    def device(self) -> None:
        return None

    def secrets(self, payload: WorkerPayload) -> WorkerSecrets:
        return self._secrets

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        if self.resume_from is not None:
            yield self.resume_from
            return
        latest = find_latest_checkpoint(self.run_dir)
        yield str(latest) if latest else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        target = os.path.join(self.run_dir, checkpoint_name(step))
        shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
        kept = sorted(p for p in os.listdir(self.run_dir) if CHECKPOINT_DIR.fullmatch(p))
        for old in kept[:-self.keep]:
            shutil.rmtree(os.path.join(self.run_dir, old), ignore_errors=True)
