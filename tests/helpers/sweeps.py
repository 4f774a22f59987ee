"""Helpers of the sweep tests: what a trial's Train run leaves in storage, without training it."""

from __future__ import annotations

from pathlib import Path

import torch
from dcdit.checkpoint import checkpoint_dir, save_checkpoint


def save_trial_checkpoint(plan, name: str, step: int, metrics: dict[str, float]) -> str:
    """A valid checkpoint (manifest last) of trial `name` at `step` with `metrics` in its state, where the trial's
    Train run keeps them ({sweep storage}/{trial}/checkpoint_{step}); returns its directory name."""
    directory = checkpoint_dir(Path(plan.sweep_storage.root) / name, step)
    save_checkpoint(directory, model_state={"w": torch.zeros(1)}, state={"step": step, "metrics": metrics})
    return directory.name
