"""The sweep's summary: one entry per trial from its record (or, for a trial without one, from its Train run's
run record and checkpoints), the MLflow runs an interrupted driver leaves KILLED, and the table `dcdit sweep`
prints without --json.
"""

from __future__ import annotations

import contextlib

from dcdit.errors import DCDiTError
from dcdit_platform.runs import read_run_record
from dcdit_platform.sweeps.plan import SweepPlan
from dcdit_platform.sweeps.state import INTERRUPTED, PENDING, SweepState, jsonable, progress


def summarize(plan: SweepPlan, state: SweepState, parent_run_id: str) -> dict:
    """The sweep's JSON summary (without its status): where it lies and what each trial reached."""
    trials = []
    for t in plan.trials:
        record = state.trial(t.name)
        entry = {"name": t.name, "kind": t.kind, "overrides": jsonable(t.overrides)}
        if record is not None:
            entry.update({k: record.get(k) for k in ("status", "step", "checkpoint", "mlflow_run_id", "metrics")})
            if record.get("evaluation") is not None:
                entry["evaluation"] = record["evaluation"]
            if record.get("error"):
                entry["error"] = record["error"]
            for key in ("resumed_from", "wall_s"):
                if record.get(key) is not None:
                    entry[key] = record[key]
        else:
            run = read_run_record(plan.sweep_storage, t.name)
            done = progress(plan.sweep_storage, t.name)
            entry.update({"status": INTERRUPTED if run else PENDING, "step": done["step"],
                          "checkpoint": done["checkpoint"], "mlflow_run_id": run.get("mlflow_run_id") if run else None,
                          "metrics": done["metrics"]})
        trials.append(entry)
    return {"name": plan.name, "mlflow_run_id": parent_run_id, "tracking_uri": plan.display_tracking_uri,
            "experiment": plan.experiment, "storage": plan.sweep_storage.uri, "trials": trials}


def close_unfinished(summary: dict, tracker) -> None:
    """The driver is stopping with trials unfinished: their runs are KILLED until --resume reopens them."""
    for trial in summary["trials"]:
        if trial["status"] == INTERRUPTED and trial.get("mlflow_run_id"):
            with contextlib.suppress(DCDiTError):
                if tracker.get_run(trial["mlflow_run_id"]).info.status == "RUNNING":
                    tracker.finish(trial["mlflow_run_id"], "KILLED")


def format_table(summary: dict) -> str:
    """The summary as `dcdit sweep` prints it: a heading line, then trial, status, step, train/loss, MLflow run."""
    rows = [("trial", "status", "step", "train/loss", "MLflow run")]
    for t in summary["trials"]:
        loss = (t.get("metrics") or {}).get("train/loss")
        rows.append((t["name"], t["status"], str(t.get("step") or "-"),
                     f"{loss:.4f}" if isinstance(loss, float) else "-", t.get("mlflow_run_id") or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([f"sweep {summary['name']}: {summary['status']}; MLflow parent run {summary['mlflow_run_id']} "
                      f"at {summary['tracking_uri']} (experiment {summary['experiment']})", *lines])


__all__ = ["summarize", "close_unfinished", "format_table"]
