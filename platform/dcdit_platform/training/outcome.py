"""How a training run ends, told truthfully: `OutcomeBox`, the small actor a Ray driver owns, where rank 0 counts
worker-group starts and leaves the run's outcome (Ray Train V2 keeps only metrics reported with a checkpoint, so
an early stop would otherwise be lost; the box dies with its driver, which tells orphaned workers to stop); and
the driver's side: the MLflow run closed as FINISHED only when the last step was reached and every metric logged,
else FAILED with the cause in one line (`RunFailed` carries the `--json` summary).
"""

from __future__ import annotations

import contextlib

import ray

from dcdit.errors import DCDiTError
from dcdit_platform.runs import latest_checkpoint_state, verify_checkpoint
from dcdit_platform.secrets import redact
from dcdit_platform.tracking import TrackingUnavailable


@ray.remote(num_cpus=0, max_restarts=0)
class OutcomeBox:
    def __init__(self):
        self.starts = 0
        self.outcome: dict | None = None

    def start(self) -> int:
        """Count a worker-group start; returns its index (0: the first)."""
        self.starts += 1
        return self.starts - 1

    def finish(self, outcome: dict) -> None:
        self.outcome = dict(outcome)

    def read(self) -> tuple[int, dict | None]:
        """(worker-group starts, the last outcome left)."""
        return self.starts, self.outcome

    def ping(self) -> bool:
        return True


class RunFailed(DCDiTError):
    """The run failed (its MLflow run is FAILED); `summary` is what `--json` prints for it."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def fail_run(run, error: str) -> RunFailed:
    """Close the MLflow run as FAILED (best effort: the server may be the cause) and build the RunFailed."""
    with contextlib.suppress(DCDiTError):
        run.tracker.finish(run.run_id, "FAILED")
    latest = _latest(run)
    state = latest[1] if latest else {}
    metrics = {k: v for k, v in state.get("metrics", {}).items() if k != "step"}
    summary = run.summary(step=int(state.get("step", 0)), checkpoint=run.plan.storage.join(run.plan.name, latest[0])
                          if latest else None, metrics=metrics, status="FAILED", error=error)
    return RunFailed(error, summary)


def finish_run(run, outcome: dict | None) -> dict:
    """The summary of a run whose workers ended with `outcome`: metrics they could not log are taken from the
    final checkpoint and logged, then the MLflow run is FINISHED; an error, a missing outcome or a tracking server
    that stays away raise RunFailed instead."""
    plan = run.plan
    if outcome is None:
        raise fail_run(run, f"the workers of run {plan.name} ended without reporting an outcome; see the Ray logs, "
                            f"then `dcdit resume {plan.name}`")
    if outcome.get("error"):
        raise fail_run(run, f"{outcome['error']} (run {plan.name})")
    step = int(outcome["step"])
    checkpoint = outcome.get("checkpoint") or f"checkpoint_{step:08d}"
    try:
        if outcome.get("pending_metrics"):
            state = verify_checkpoint(plan.storage.child(plan.name), checkpoint, sha256=False)
            run.tracker.log_metric_records(run.run_id, state.get("pending_metrics") or [])
            run.tracker.set_tags(run.run_id, {"dcdit.tracking_outage": f"{len(state['pending_metrics'])} steps "
                                                                       "logged from the final checkpoint"})
        run.tracker.finish(run.run_id, "FINISHED")
    except TrackingUnavailable as err:
        message = (f"run {plan.name} reached step {step} ({checkpoint}) but {err}; the metrics MLflow has not "
                   f"taken are kept in that checkpoint, and `dcdit resume {plan.name}` logs them and closes the run "
                   "once the server is back")
        summary = run.summary(step=step, checkpoint=plan.storage.join(plan.name, checkpoint),
                              metrics=_metrics(outcome), status="FAILED", error=message)
        raise RunFailed(message, summary) from None
    return run.summary(step=step, checkpoint=plan.storage.join(plan.name, checkpoint), metrics=_metrics(outcome))


def _metrics(outcome: dict) -> dict:
    return {k: v for k, v in outcome.items() if k not in ("step", "done", "checkpoint", "pending_metrics")}


def _latest(run) -> tuple[str, dict] | None:
    with contextlib.suppress(DCDiTError):
        return latest_checkpoint_state(run.plan.storage.child(run.plan.name))
    return None


def failure_message(plan, err: Exception, *, restarts: int) -> str:
    """One line naming the root cause of a failed fit, the restarts that actually happened and the last good
    checkpoint."""
    causes = list(getattr(err, "worker_failures", {}).items())
    root: BaseException = causes[0][1] if causes else getattr(err, "controller_failure", err)
    seen = set()
    while id(root) not in seen:
        seen.add(id(root))
        inner = getattr(root, "cause", None) or root.__cause__
        if isinstance(root, DCDiTError) or inner is None:
            break
        root = inner
    where = f"worker rank {causes[0][0]}" if causes else "the Ray Train controller"
    if isinstance(root, DCDiTError):
        detail = str(root)
    else:
        lines = [ln for ln in str(root).splitlines() if ln.strip()]
        detail = f"{type(root).__name__}: {lines[-1] if lines else ''}"
    try:
        latest = latest_checkpoint_state(plan.storage.child(plan.name))
        kept = f"last good checkpoint {plan.storage.join(plan.name, latest[0])}" if latest else "no checkpoint yet"
    except DCDiTError:
        kept = "the storage is unreachable now, so its last good checkpoint is unknown"
    return redact(f"training failed in {where} after {restarts} restart(s): {' '.join(detail.split())[:400]}; "
                  f"{kept}; fix and run `dcdit resume {plan.name}`")


__all__ = ["OutcomeBox", "RunFailed", "fail_run", "finish_run", "failure_message"]
