"""Checkpoints of a training run, seen from a worker: which one to resume from (`restore`), when to save (every
`checkpoint.every` steps and the last), what (weights, EMA, optimizer, and state.json with the data cursor and
every rank's RNG) and where (rank 0 writes a temporary folder that the session hands to storage).
"""

from __future__ import annotations

import shutil
import tempfile

import torch.distributed as dist

from dcdit.checkpoint import Checkpoint, capture_rng_state, load_checkpoint, save_checkpoint
from dcdit.errors import DCDiTError
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.training.metrics import LoopClock
from dcdit_platform.training.payload import WorkerPayload
from dcdit_platform.training.sessions import Session
from dcdit_platform.training.state import TrainState


def restore(session: Session, payload: WorkerPayload) -> Checkpoint | None:
    """The checkpoint the session hands back (None: a fresh start); one of another config is refused."""
    with session.checkpoint() as ckpt_dir:
        ckpt = load_checkpoint(ckpt_dir) if ckpt_dir else None
    if ckpt and ckpt.state.get("config_hash") not in (None, payload.config_hash):
        raise DCDiTError(f"checkpoint {ckpt_dir} was written by a run with another config "
                         f"({ckpt.state.get('config_hash')} vs {payload.config_hash})")
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

    def save(self, step: int, metrics: dict, state: TrainState, data_cursor: dict) -> None:
        """A collective: every rank calls it at the same step (RNG states are gathered, then reported).

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
        tmp = None
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="dcdit-ckpt-")
            t = self.config.train
            state_json = {"step": step, "data_cursor": data_cursor, "world_size": world,
                          "rng": {str(k): v for k, v in rng.items()}, "config_hash": self.payload.config_hash,
                          "mlflow_run_id": self.run_id, "run_name": self.payload.name,
                          "images_seen": step * t.global_batch,
                          "phase": "distill" if step < t.distill_steps else "train", "metrics": metrics}
            save_checkpoint(tmp, model_state=state.model.state_dict(), ema_state=state.ema.state_dict(),
                            optimizer_state=state.optimizer.state_dict(), state=state_json,
                            config=self.payload.config)
        try:
            self.session.report(metrics, checkpoint_dir=tmp, step=step)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        self.last_step = step
