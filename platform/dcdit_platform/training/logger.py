"""What a training worker tells MLflow (rank 0 only): its start, step metrics with a progress line, artifacts,
and the error it stopped on. Steps MLflow already holds are not logged again (a resumed run repeats steps), and an
unreachable tracking server stops every rank at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile

import torch.distributed as dist
import torch.nn as nn

from dcdit.errors import DCDiTError
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.tracking import Tracker, TrackingUnavailable
from dcdit_platform.training.artifacts import write_artifacts
from dcdit_platform.training.runtime import Runtime

# A logger, not print: Ray Train patches print into its logger and can echo it twice.
_progress = logging.getLogger("dcdit.train")


class StepLogger:
    """Rank 0's MLflow client for one run; on other ranks it only takes part in agreeing to stop."""

    def __init__(self, config: ExperimentConfig, *, name: str, run_id: str, tracking_uri: str, rank: int,
                 world_size: int, start: int):
        self.config, self.name, self.run_id, self.world_size = config, name, run_id, world_size
        self.tracker: Tracker | None = None
        self.logged_until = 0
        if rank == 0:
            self.tracker = Tracker(tracking_uri, retry_timeout_s=config.tracking.retry_timeout_s)
            self.logged_until = self.tracker.last_logged_step(run_id)
            # How often a worker group started this run: > 1 means Ray restarted it after a failure (or a resume).
            starts = int(self.tracker.get_run(run_id).data.tags.get("dcdit.worker_starts", "0")) + 1
            self.tracker.set_tags(run_id, {"dcdit.worker_starts": starts, "dcdit.resumed_from_step": start})

    def publish(self, step: int, metrics: dict | None, ema: nn.Module | None, runtime: Runtime) -> str | None:
        """Log `metrics` (when given) and draw artifacts from `ema` (when given) at `step`. Returns why the run must
        stop (the tracking server is unreachable), the same on every rank, or None."""
        if metrics is None and ema is None:
            return None
        fatal = None
        if self.tracker is not None and step > self.logged_until:
            try:
                if metrics is not None:
                    self.tracker.log_metrics(self.run_id, {k: v for k, v in metrics.items() if k != "step"}, step)
                    _log_progress(self.name, step, self.config.train.steps, metrics)
                if ema is not None:
                    with tempfile.TemporaryDirectory(prefix="dcdit-art-") as tmp:
                        for path in write_artifacts(ema, self.config, step, runtime, tmp):
                            self.tracker.log_artifact(self.run_id, path, "samples")
            except TrackingUnavailable as err:
                fatal = f"{err}; stopped at step {step}"
        if self.world_size > 1:
            holder = [fatal]
            dist.broadcast_object_list(holder, src=0)
            fatal = holder[0]
        return fatal

    def record_error(self, message: str) -> None:
        """Best effort: the server may be what failed."""
        if self.tracker is None:
            return
        self.tracker.retry_timeout_s = min(self.tracker.retry_timeout_s, 10.0)
        with contextlib.suppress(DCDiTError):
            self.tracker.set_tags(self.run_id, {"dcdit.error": message})


def _log_progress(name: str, step: int, steps: int, metrics: dict) -> None:
    parts = [f"loss {metrics['train/loss']:.4f}"]
    if "router/compression_effective" in metrics:
        parts.append(f"compression {metrics['router/compression_effective']:.2f}")
    parts += [f"grad {metrics['optim/grad_norm']:.3f}", f"{metrics['perf/images_per_s']:.1f} img/s"]
    _progress.info("[%s] step %d/%d %s", name, step, steps, " ".join(parts))
