"""Checkpoints of a training run, seen from a worker: which one to resume from (`restore`: the driver's verified
pick on the first start, the newest verified one after a restart), when to save (every `checkpoint.every` steps
and the last), what (weights, EMA, optimizer, and state.json with the data cursor, every rank's RNG and the
metrics MLflow has not taken yet) and how (rank 0 writes a staging folder that the session uploads).
"""

from __future__ import annotations

import shutil

import torch.distributed as dist

from dcdit.checkpoint import Checkpoint, capture_rng_state, load_checkpoint, save_checkpoint
from dcdit.errors import DCDiTError
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.runs import check_model_weights, newest_checkpoint
from dcdit_platform.training.metrics import LoopClock
from dcdit_platform.training.payload import WorkerPayload
from dcdit_platform.training.sessions import Session
from dcdit_platform.training.state import TrainState
from dcdit_platform.training.upload import prune_staging


def agree(session: Session, error: str | None) -> None:
    """A collective: every rank calls it at the same point with its own error (or None); if any rank failed,
    every rank raises the first error, so that all stop at the same step instead of waiting for each other."""
    if session.world_size > 1:
        gathered: list = [None] * session.world_size
        dist.all_gather_object(gathered, error)
        error = next((e for e in gathered if e), None)
    if error:
        raise DCDiTError(error)


def collective(session: Session, fn):
    """`fn()` on every rank, its DCDiTError agreed on (see `agree`); returns rank 0's result on every rank."""
    result, error = None, None
    try:
        result = fn()
    except DCDiTError as err:
        error = str(err)
    agree(session, error)
    if session.world_size > 1:
        holder = [result]
        dist.broadcast_object_list(holder, src=0)
        result = holder[0]
    return result


def resume_point(session: Session, payload: WorkerPayload) -> str | None:
    """The checkpoint this worker group resumes from, the same on every rank: on the group's first start the one
    the driver verified and named (payload.resume_from); after a failure the newest that verifies, never older."""
    def choose() -> str | None:
        if session.rank != 0 or session.attempt() == 0:
            return payload.resume_from
        floor = int(payload.resume_from.rsplit("_", 1)[1]) if payload.resume_from else 0
        newest, _ = newest_checkpoint(session.run_storage, at_least=floor)
        return newest[0] if newest else payload.resume_from

    return collective(session, choose)


def restore(session: Session, payload: WorkerPayload, config: ExperimentConfig) -> Checkpoint | None:
    """The checkpoint to resume from (None: a fresh start), checked: its config hash and its weights' names and
    shapes must be this run's. A collective; any rank's failure is every rank's DCDiTError."""
    dirname = resume_point(session, payload)
    if session.rank == 0:
        prune_staging(session.staging, int(dirname.rsplit("_", 1)[1]) if dirname else 0)
    # Every rank waits here until rank 0 has cleaned this machine's staging folder, where the ranks then download
    # their copies: without the wait the clean-up deleted a copy another rank was reading (a restarted group on
    # one machine failed with FileNotFoundError on MANIFEST.json).
    agree(session, None)
    if dirname is None:
        return None

    def load() -> Checkpoint:
        with session.checkpoint(dirname) as local:
            ckpt = load_checkpoint(local)
        if ckpt.state.get("config_hash") not in (None, payload.config_hash):
            raise DCDiTError(f"checkpoint {dirname} was written by a run with another config "
                             f"({ckpt.state.get('config_hash')} vs {payload.config_hash})")
        check_model_weights(ckpt.model_state, config.model, f"checkpoint {dirname}")
        return ckpt

    ckpt, error = None, None
    try:
        ckpt = load()  # every rank reads its own copy (its RNG state is in it)
    except DCDiTError as err:
        error = str(err)
    agree(session, error)
    return ckpt


class Checkpointer:
    """Saves a worker's checkpoints and remembers the last one (what an early stop points to)."""

    def __init__(self, config: ExperimentConfig, payload: WorkerPayload, session: Session, *, run_id: str,
                 clock: LoopClock, last_step: int | None):
        self.config, self.payload, self.session = config, payload, session
        self.run_id, self.clock = run_id, clock
        self.last_step = last_step  # the step of the newest checkpoint, None before the first

    def due(self, step: int) -> bool:
        return step % self.config.checkpoint.every == 0 or step == self.config.train.steps

    def last_good(self) -> str:
        """The newest checkpoint in words, for messages."""
        return f"step {self.last_step}" if self.last_step else "none yet"

    def save(self, step: int, metrics: dict, state: TrainState, data_cursor: dict, extra: dict | None = None, *,
             reported: dict | None = None) -> None:
        """A collective: every rank calls it at the same step (RNG states are gathered, then reported). `extra`
        goes into state.json (the metrics MLflow has not taken yet), `reported` into the report only (the newest
        evaluation during training: a sweep's scheduler reads it, a resumed run must not). A failed upload raises
        the same DCDiTError on every rank, after the last good checkpoint, so that all stop at this step.

        Ray Train's report is a barrier whose queue holds one result, drained by the controller every ~2 s
        (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): reporting every step would throttle training to that rate, so only
        checkpoint steps report; step metrics go to MLflow directly from rank 0."""
        rank, world = self.session.rank, self.session.world_size
        rng = {rank: capture_rng_state()}
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, rng)
            rng = {k: v for part in gathered for k, v in part.items()}
        metrics = {**metrics, **self.clock.timings()}
        staged = None
        if rank == 0:
            staged = self.session.staging / f"checkpoint_{step:08d}"
            t = self.config.train
            state_json = {"step": step, "data_cursor": data_cursor, "world_size": world,
                          "rng": {str(k): v for k, v in rng.items()}, "config_hash": self.payload.config_hash,
                          "mlflow_run_id": self.run_id, "run_name": self.payload.name,
                          "images_seen": step * t.global_batch,
                          "phase": "distill" if step < t.distill_steps else "train", "metrics": metrics,
                          **(extra or {})}
            save_checkpoint(staged, model_state=state.model.state_dict(), ema_state=state.ema.state_dict(),
                            optimizer_state=state.optimizer.state_dict(), state=state_json,
                            config=self.payload.config)
        collective(self.session, lambda: self.session.report({**metrics, **(reported or {})},
                                                             checkpoint_dir=str(staged) if staged else None,
                                                             step=step))
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)  # uploaded: the staged copy is no longer the only one
        self.last_step = step
