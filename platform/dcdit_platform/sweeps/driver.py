"""`run_sweep`, the sweep's driver: checks that the planned sweep may start (or resume), opens its MLflow parent
run and writes its record, runs the unfinished trials on Ray Tune with as many at once as the cluster holds, and
closes with the summary.

The sweep's own records in storage are the source of truth on `--resume`: Tune's experiment state is never
restored (a killed driver can leave `tuner.pkl` truncated, ray#58179, and a restored Tuner would keep the old
cluster's concurrency). Finished trials are skipped; the others re-run their trial function, whose Train run
(stable name = trial name, stored under the sweep) resumes from its own checkpoints in its own MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable

import ray
import yaml

from dcdit.errors import DCDiTError
from dcdit_platform import console
from dcdit_platform.raycluster import ray_session, target_address
from dcdit_platform.secrets import redact, redact_config
from dcdit_platform.sweeps.placement import resolve_max_concurrent
from dcdit_platform.sweeps.plan import SweepPlan
from dcdit_platform.sweeps.state import FAILED, FINISHED, INTERRUPTED, PENDING, SweepState, check_compatible, jsonable
from dcdit_platform.sweeps.summary import close_unfinished, summarize
from dcdit_platform.sweeps.tuner import SweepCallback, run_trials
from dcdit_platform.tracking import Tracker, flat_params
from dcdit_platform.training import plan_run


def run_sweep(plan: SweepPlan, *, resume: bool = False, address: str | None = None,
              echo: Callable[[str], None] | None = None) -> dict:
    """Run (or, with `resume`, continue) the planned sweep on Ray Tune; returns the JSON summary."""
    echo = echo or console.echo("sweep")
    started = time.perf_counter()
    # MLflow's telemetry thread sets and unsets an environment variable while other threads read os.environ
    # (KeyError in tracking.redact); clusters rarely reach its endpoint anyway. Inherited by a local Ray's workers.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    state = SweepState(plan.sweep_storage)
    record = state.sweep()
    added = _check_start(plan, state, record, resume)
    if added:
        echo(f"{len(added)} trial(s) added since the sweep started: {', '.join(added)}")

    tracker = Tracker(plan.tracking_uri)
    parent = _open_parent_run(plan, tracker, record)
    attempt = int((record or {}).get("attempts", 0)) + 1
    _write_sweep_record(plan, state, record, parent, attempt)
    echo(f"sweep {plan.name}: {len(plan.trials)} trials, MLflow parent run {parent} at {plan.display_tracking_uri} "
         f"(experiment {plan.experiment}), storage {redact(plan.sweep_storage.uri)}")

    final = {t.name for t in plan.trials if state.is_final(t.name)}
    todo = [t.name for t in plan.trials if t.name not in final]
    if final:
        echo(f"{len(final)} trial(s) already done, not re-run: {', '.join(sorted(final))}")
    callback = SweepCallback(plan, tracker, state, echo, replayed=final)
    interrupted, max_concurrent = False, None
    if todo:
        # With a scheduler, done trials replay their recorded metric history first, so ASHA's rungs hold them.
        replays = [t.name for t in plan.trials if t.name in final] if plan.spec.scheduler.type != "none" else []
        try:
            # The dashboard stays on: Train V2 in Tune needs the State API to clean up stopped trials' placement
            # groups.
            with ray_session(address, dashboard=True) as started_ray:
                local = started_ray and not target_address(address)
                limit = _max_concurrent(plan, len(todo), local, echo)
                run_trials(plan, callback, names=replays + todo, parent_run_id=parent, max_concurrent=limit,
                           attempt=attempt)
                max_concurrent = limit  # an interrupted sweep's summary says None
        except KeyboardInterrupt:
            interrupted = True
    summary = summarize(plan, state, parent)
    _close(summary, tracker, parent, interrupted)
    summary["max_concurrent_trials"] = max_concurrent
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    return summary


def _check_start(plan: SweepPlan, state: SweepState, record: dict | None, resume: bool) -> list[str]:
    """Refuse to start over an existing sweep (without --resume) or to resume one with other trials, and check
    every trial's data, storage and upcycling sources before anything starts; returns the trials added since."""
    if record is not None and not resume:
        done = sum(1 for t in plan.trials if state.is_final(t.name))
        raise DCDiTError(f"sweep {plan.name} already exists at {redact(plan.sweep_storage.uri)} ({done} of "
                         f"{len(plan.trials)} trials done): pass --resume to finish it, or --name for a new sweep")
    added = check_compatible(plan, record) if record is not None else []
    for trial in plan.trials:
        plan_run(trial.config, name=trial.name)
    return added


def _open_parent_run(plan: SweepPlan, tracker: Tracker, record: dict | None) -> str:
    """The sweep's MLflow run (reopened on resume); a new one gets the sweep file as params and an artifact."""
    parent = tracker.open_run(experiment=plan.experiment, run_name=plan.name,
                              run_id=(record or {}).get("mlflow_run_id"),
                              tags={"dcdit.sweep": plan.name, "dcdit.kind": "sweep"})
    if record is not None:
        return parent
    if "dcdit.config_hash" in tracker.get_run(parent).data.tags:
        raise DCDiTError(f"MLflow experiment {plan.experiment} already has a training run named {plan.name}; "
                         "choose another sweep name with --name")
    params = flat_params(redact_config({k: v for k, v in plan.source.items() if k not in ("baselines",)}))
    tracker.log_params(parent, {**{f"sweep.{k}": v for k, v in params.items()}, "sweep.trials": len(plan.trials),
                                "sweep.baselines": json.dumps([t.name for t in plan.trials if t.kind == "baseline"])})
    tracker.log_text(parent, yaml.safe_dump(redact_config(plan.source), sort_keys=False), "sweep/sweep.yaml")
    return parent


def _write_sweep_record(plan: SweepPlan, state: SweepState, record: dict | None, parent: str, attempt: int) -> None:
    state.write_sweep({
        "name": plan.name, "mlflow_run_id": parent, "experiment": plan.experiment,
        "tracking_uri": plan.display_tracking_uri, "sweep_file": plan.path, "attempts": attempt,
        "created_unix": (record or {}).get("created_unix", time.time()),
        "source": redact_config(plan.source),
        "trials": [{"name": t.name, "kind": t.kind, "overrides": jsonable(t.overrides), "config_hash": t.config_hash,
                    "config": redact_config(t.config.to_dict())} for t in plan.trials]})


def _max_concurrent(plan: SweepPlan, pending: int, local: bool, echo: Callable[[str], None]) -> int:
    """How many trials run at once on the Ray cluster this driver is connected to (said, with any warning)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    footprint = plan.footprint
    max_concurrent, warning = resolve_max_concurrent(plan.spec.max_concurrent_trials, nodes, footprint, pending,
                                                     local=local, autoscaling=plan.spec.autoscaling)
    if warning:
        echo(f"warning: {warning}")
    echo(f"running {pending} trial(s), at most {max_concurrent} at once ({footprint.num_workers} worker(s) "
         f"x {footprint.cpus_per_worker:g} CPU{' + GPU' if footprint.gpus_per_worker else ''} each)")
    return max_concurrent


def _close(summary: dict, tracker: Tracker, parent: str, interrupted: bool) -> None:
    """Set the sweep's status in the summary and its MLflow parent run (which gets the summary as an artifact)."""
    statuses = [t["status"] for t in summary["trials"]]
    if interrupted or any(s in (INTERRUPTED, PENDING) for s in statuses):
        close_unfinished(summary, tracker)
        summary["status"] = "INTERRUPTED"
    else:
        summary["status"] = FAILED if FAILED in statuses else FINISHED
    with contextlib.suppress(DCDiTError):
        tracker.log_text(parent, json.dumps(summary, indent=1, sort_keys=True, default=str), "sweep/summary.json")
        tracker.set_tags(parent, {"dcdit.sweep.status": summary["status"],
                                  "dcdit.sweep.finished": sum(s == FINISHED for s in statuses)})
        tracker.finish(parent, {"INTERRUPTED": "KILLED", FAILED: "FAILED"}.get(summary["status"], "FINISHED"))


__all__ = ["run_sweep"]
