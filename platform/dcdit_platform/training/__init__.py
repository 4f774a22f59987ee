"""Training on Ray Train (transitional: re-exports dcdit_platform.train until it is split into this package)."""

from dcdit_platform.train import RunPlan, plan_run, run_local, run_training

__all__ = ["RunPlan", "plan_run", "run_training", "run_local"]
