"""Training on Ray Train (DDP over gloo on CPU, NCCL on GPU) or in one process, tracked in MLflow.

driver (plan_run, run_training, run_local) -> worker (the loop's spine) -> state, step, metrics, logger,
checkpointer, artifacts; sessions (Ray or local), runtime (device, precision), data (dataset and reader).
"""

from dcdit_platform.training.driver import RunPlan, plan_run, run_local, run_training
from dcdit_platform.training.outcome import RunFailed

__all__ = ["RunPlan", "RunFailed", "plan_run", "run_training", "run_local"]
