"""The trial as Tune runs it: `trial_main`, a function trainable that trains (or resumes) one trial's Ray Train run,
evaluates its last checkpoint with the sweep's protocol and records the result; and the `TrialContext` every trial
is given.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from dcdit_platform import console
from dcdit_platform.config import ExperimentConfig, build_config, set_dotted
from dcdit_platform.evaluation import EvalConfig
from dcdit_platform.runs import latest_checkpoint_state
from dcdit_platform.secrets import secret_env
from dcdit_platform.storage import open_storage
from dcdit_platform.sweeps.plan import SweepPlan, eval_protocol
from dcdit_platform.sweeps.state import FINAL, FINISHED, SweepState, recorded_history
from dcdit_platform.tracking import Tracker
from dcdit_platform.training import plan_run, run_training
from dcdit_platform.training.periodic_eval import (EVAL_KEYS, EVAL_METRICS, EvalRequest, is_number, launch,
                                                   time_attribute)


@dataclass(frozen=True, kw_only=True)
class TrialContext:
    """What every trial of one sweep attempt is given. Tune passes it through the object store
    (`tune.with_parameters`), never in a task spec: the tracking URI and `env` may hold credentials."""

    sweep_uri: str  # {storage}/{sweep}: the sweep's records and its trials' Train runs
    storage_options: dict[str, Any]  # StorageOptions fields of the storage root
    tracking_uri: str
    parent_run_id: str  # the sweep's MLflow run; each trial's run is its child
    env: dict[str, str]  # secret environment variables for the trial's process and its evaluation
    trees: dict[str, dict[str, Any]]  # trial name -> its config tree (as load_sweep built it)
    evaluation: dict[str, Any] | None  # the sweep's evaluation protocol as EvalConfig keyword arguments
    scheduler_metric: str | None  # the metric the scheduler decides on; None without a scheduler

    @classmethod
    def of(cls, plan: SweepPlan, parent_run_id: str) -> TrialContext:
        spec = plan.spec
        return cls(sweep_uri=plan.sweep_storage.uri, storage_options=dataclasses.asdict(plan.storage.options),
                   tracking_uri=plan.tracking_uri, parent_run_id=parent_run_id,
                   env={**secret_env(), "MLFLOW_DISABLE_TELEMETRY": os.environ["MLFLOW_DISABLE_TELEMETRY"]},
                   trees={t.name: t.tree for t in plan.trials},
                   evaluation=eval_protocol(spec.evaluation, plan.trials[0].config.resources)
                   if spec.evaluation is not None else None,
                   scheduler_metric=spec.scheduler.reported_metric)

    def trial_config(self, name: str) -> ExperimentConfig:
        """Trial `name`'s config, tracked as a child of the sweep's run."""
        tree = copy.deepcopy(self.trees[name])
        set_dotted(tree, "tracking.uri", self.tracking_uri)
        set_dotted(tree, "tracking.parent_run_id", self.parent_run_id)
        return build_config(tree)

    def sweep_state(self) -> SweepState:
        return SweepState(open_storage(self.sweep_uri, self.storage_options or None))

    def eval_request(self, checkpoint: str) -> EvalRequest:
        """The sweep's evaluation of `checkpoint`, tracked in the run that wrote it (needs `evaluation`)."""
        config = EvalConfig(checkpoint=checkpoint, tracking_uri=self.tracking_uri, storage=self.sweep_uri,
                            track=True, **self.evaluation)
        return EvalRequest(config=config, env=self.env, label="sweep eval")


def trial_main(config: dict, ctx: TrialContext) -> None:
    """Tune's function trainable: train (or resume) this trial's Ray Train run, evaluate it, record the result.

    A trial that already has a final record only replays its metric history to the scheduler (see `run_sweep`)."""
    started = time.perf_counter()
    name = config["trial"]
    for key, value in ctx.env.items():
        os.environ.setdefault(key, value)
    state = ctx.sweep_state()
    record = state.trial(name)
    if record is not None and record.get("status") in FINAL:
        for step, value in record.get("history", []):
            tune.report({"step": step, time_attribute(ctx.scheduler_metric): step, ctx.scheduler_metric: value,
                         "replayed": True})
        return

    plan = plan_run(ctx.trial_config(name), name=name)
    latest = latest_checkpoint_state(state.storage.child(name))
    resumed_from = latest[0] if latest else None

    # The Train run's progress lines go to the trial's stderr as `dcdit train: ...` (Ray forwards them to the driver).
    summary = run_training(plan, callbacks=[TuneReportCallback()], echo=console.echo("train"))
    metrics = dict(summary.get("metrics") or {})
    _await_decision(ctx.scheduler_metric, metrics)
    evaluation = None
    if ctx.evaluation is not None and summary.get("checkpoint"):
        evaluation = evaluate_trial(ctx.eval_request(summary["checkpoint"]))
        metrics.update({f"eval/{k}": v for k, v in evaluation.items() if k in EVAL_METRICS and is_number(v)})
    history = (recorded_history(Tracker(ctx.tracking_uri), summary["mlflow_run_id"], ctx.scheduler_metric)
               if ctx.scheduler_metric else [])
    state.write_trial(name, {"name": name, "status": FINISHED, "step": summary.get("step"),
                             "checkpoint": summary.get("checkpoint"), "mlflow_run_id": summary["mlflow_run_id"],
                             "metrics": metrics, "evaluation": evaluation, "history": history,
                             "resumed_from": resumed_from, "wall_s": round(time.perf_counter() - started, 3),
                             "ended_unix": time.time()})


def _await_decision(metric: str | None, metrics: dict) -> None:
    """A scheduler ranking by an evaluation during training sees the run's last score after its last step (the Train
    run reports it at its end): report it once more from the trial, which returns only when the scheduler lets the
    trial go on (a function trainable's report waits for that). A trial stopped on that score thus never writes
    its FINISHED record, and the sweep records it as STOPPED, whatever the race between its end and the decision."""
    if metric and time_attribute(metric) != "step" and metric in metrics:
        tune.report({metric: metrics[metric], time_attribute(metric): metrics[time_attribute(metric)]})


def evaluate_trial(request: EvalRequest) -> dict:
    """The sweep's evaluation protocol on a finished trial's checkpoint (dcdit_platform.evaluation); its metrics go
    to the trial's MLflow run and come back for the sweep summary. The trial's Train workers have ended by now, so
    the evaluator's actors use the resources they held (a task outside the trial's placement group: `launch`)."""
    return ray.get(launch(request))


__all__ = ["trial_main", "TrialContext", "EvalRequest", "evaluate_trial", "EVAL_METRICS", "EVAL_KEYS"]
