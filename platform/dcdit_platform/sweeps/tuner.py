"""The trials on Ray Tune: `run_trials` builds the Tuner (one grid point per trial name, the ASHA scheduler, the
concurrency, Tune's own logs under the sweep), and `SweepCallback` keeps the driver's books as Tune reports trial
events: progress lines, and records plus MLflow status for trials that end without finishing.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from dcdit.errors import DCDiTError
from dcdit_platform.runs import read_run_record
from dcdit_platform.secrets import redact
from dcdit_platform.sweeps.plan import SweepPlan
from dcdit_platform.sweeps.state import (FAILED, FINAL, FINISHED, STOPPED, TUNE_DIR, SweepState, progress,
                                         recorded_history)
from dcdit_platform.sweeps.trainable import TrialContext, trial_main
from dcdit_platform.training.periodic_eval import time_attribute


STRICT_METRICS_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


def trial_name(trial) -> str:
    return trial.config["trial"]


class SweepCallback(tune.Callback):
    """Driver-side bookkeeping as Tune reports trial events: records and MLflow status for trials that end
    without finishing (stopped by the scheduler, or failed after their retries)."""

    def __init__(self, plan: SweepPlan, tracker, state: SweepState, echo: Callable[[str], None],
                 replayed: set[str]):
        self.plan, self.tracker, self.state, self.echo = plan, tracker, state, echo
        self.replayed = replayed  # trials done before this attempt (they only replay their history)

    def on_trial_start(self, iteration, trials, trial, **info):
        name = trial_name(trial)
        if name in self.replayed:
            self.echo(f"trial {name} is done; replaying its metrics to the scheduler")
        else:
            self.echo(f"trial {name} started")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.echo(f"trial {trial_name(trial)} failed; retrying (attempt {trial.num_failures + 1}), "
                  "resuming from its last checkpoint")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.trial_ended(trial_name(trial), None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.trial_ended(trial_name(trial), _error_text(trial))

    def trial_ended(self, name: str, error: str | None) -> None:
        """A Tune trial ended: finished (its record exists), stopped by the scheduler, or failed for good."""
        record = self.state.trial(name)
        if record is not None and record.get("status") in FINAL:
            if record.get("status") == FINISHED and name not in self.replayed:
                loss = record.get("metrics", {}).get("train/loss")
                self.echo(f"trial {name} finished at step {record.get('step')}"
                          + (f", train/loss {loss:.4f}" if isinstance(loss, float) else ""))
            return
        status = FAILED if error else STOPPED
        done = progress(self.plan.sweep_storage, name)
        run_id = self._run_id(name)
        steps = self.plan.trial(name).config.train.steps
        # Stopped right after its last step: it trained to the end (with no evaluation left to run). Not so when the
        # scheduler ranks by an evaluation during training: that score comes after the step, and the stop is ASHA's
        # decision on it.
        on_eval = time_attribute(self.plan.spec.scheduler.metric) != "step"
        if status == STOPPED and (done["step"] or 0) >= steps and self.plan.spec.evaluation is None and not on_eval:
            status = FINISHED
        history = []
        if status in FINAL:
            with contextlib.suppress(DCDiTError):
                history = recorded_history(self.tracker, run_id, self.plan.spec.scheduler.reported_metric)
        self.state.write_trial(name, {"name": name, "status": status, "step": done["step"],
                                      "checkpoint": done["checkpoint"], "mlflow_run_id": run_id,
                                      "metrics": done["metrics"], "error": error, "history": history,
                                      "ended_unix": time.time()})
        if run_id:
            with contextlib.suppress(DCDiTError):
                self.tracker.set_tags(run_id, {"dcdit.sweep.status": status, **({"dcdit.error": error} if error
                                                                                  else {})})
                self.tracker.finish(run_id, {STOPPED: "KILLED", FAILED: "FAILED"}.get(status, "FINISHED"))
        what = {STOPPED: f"stopped early by the scheduler at step {done['step'] or 0}",
                FINISHED: f"finished at step {steps}"}.get(status, f"failed: {error}")
        self.echo(f"trial {name} {what}")

    def _run_id(self, name: str) -> str | None:
        """The MLflow run of trial `name`'s Train run, if it got as far as writing its run record."""
        with contextlib.suppress(DCDiTError, OSError):
            record = read_run_record(self.plan.sweep_storage, name)
            if record:
                return record.get("mlflow_run_id")
        return None


def _error_text(trial) -> str:
    """The one line of a failed trial's error file worth showing: our own error if any, else the last exception."""
    text = ""
    with contextlib.suppress(Exception):
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ours = [ln for ln in lines if "DCDiTError" in ln]
    errors = [ln for ln in lines if re.search(r"\w+(Error|Exception)\b", ln)]
    picked = (ours or errors or lines or [""])[-1]
    picked = picked.split("DCDiTError: ", 1)[-1]
    return redact(" ".join(picked.split()))[:400] or "the trial failed (see Tune's error file)"


def run_trials(plan: SweepPlan, callback: SweepCallback, *, names: list[str], parent_run_id: str,
               max_concurrent: int, attempt: int) -> None:
    """Run the trials `names` (replays of done trials first, if any) on Tune, `max_concurrent` at once."""
    spec = plan.spec
    scheduler = None
    on_eval = spec.scheduler.metric.startswith("eval/")  # scored by evaluation.every, at the evaluated steps
    if spec.scheduler.type == "asha":
        s = spec.scheduler
        first = min(t.config.evaluation.every if on_eval else t.config.checkpoint.every for t in plan.trials)
        # ASHA stops every trial that reaches max_t; by default that lies past the longest trial, so trials that
        # are not cut at a rung end by finishing (and run their evaluation) rather than being stopped.
        scheduler = ASHAScheduler(time_attr=time_attribute(s.metric), metric=s.metric, mode=s.mode,
                                  max_t=s.max_t or max(t.config.train.steps for t in plan.trials) + 1,
                                  grace_period=s.grace_period or first, reduction_factor=s.reduction_factor)
    storage = plan.sweep_storage
    storage.makedirs()
    context = TrialContext.of(plan, parent_run_id)
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=context), {"cpu": plan.footprint.trial_cpus})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(names)},
        # A finished trial's actor (a process that has imported torch) runs the next trial. Not with a scheduler:
        # Tune caches the actor of an early-stopped trial whose Train run would go on holding its workers.
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler,
                                    reuse_actors=scheduler is None,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=f"{TUNE_DIR}-{attempt:02d}", storage_path=storage.root,
            storage_filesystem=None if storage.is_local else storage.filesystem,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[callback], verbose=0))
    # Tune prints its banner and Ray echoes worker output on stdout; stdout is for the summary (--json) only.
    with contextlib.redirect_stdout(sys.stderr), _lenient_metrics(spec.scheduler.type == "asha" and on_eval):
        tuner.fit()


@contextlib.contextmanager
def _lenient_metrics(lenient: bool):
    """Tune refuses a result without the scheduler's metric unless TUNE_DISABLE_STRICT_METRIC_CHECKING=1; a score
    from an evaluation during training is in the reports after it ends only (ASHA passes over the others)."""
    saved = os.environ.get(STRICT_METRICS_ENV)
    if lenient:
        os.environ[STRICT_METRICS_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(STRICT_METRICS_ENV, None)
        else:
            os.environ[STRICT_METRICS_ENV] = saved


__all__ = ["run_trials", "SweepCallback", "trial_name"]
