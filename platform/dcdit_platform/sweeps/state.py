"""The sweep's records in storage, the source of truth on `--resume`: `{storage}/{sweep}/sweep.json` (the sweep as
started: trials, config hashes, parent run) and `_trials/{trial}.json` (written once a trial ends), the trial
statuses they hold, and the check that a resumed sweep still trains the trials it started with.
"""

from __future__ import annotations

import json
from typing import Any

from dcdit.errors import DCDiTError
from dcdit_platform.runs import latest_checkpoint_state

SWEEP_RECORD = "sweep.json"  # {storage}/{sweep}/sweep.json: the sweep as started (trials, hashes, parent run)
TRIALS_DIR = "_trials"  # {storage}/{sweep}/_trials/{trial}.json: written once a trial ends
TUNE_DIR = "_tune"  # {storage}/{sweep}/_tune-{attempt}: Tune's own logs (never read back)

# Trial statuses. FINISHED and STOPPED (early-stopped by the scheduler) are final; FAILED trials run again on
# --resume; INTERRUPTED (started, driver gone) and PENDING (never started) are what --resume finishes.
FINISHED, STOPPED, FAILED, INTERRUPTED, PENDING = "FINISHED", "STOPPED", "FAILED", "INTERRUPTED", "PENDING"
FINAL = (FINISHED, STOPPED)


class SweepState:
    """The sweep's records under {storage}/{sweep}: sweep.json and one JSON per ended trial (atomic writes)."""

    def __init__(self, storage):
        self.storage = storage

    def sweep(self) -> dict | None:
        try:
            return self.storage.read_json(SWEEP_RECORD)
        except FileNotFoundError:
            return None

    def write_sweep(self, record: dict) -> None:
        self.storage.write_json(SWEEP_RECORD, record)

    def trial(self, name: str) -> dict | None:
        try:
            return self.storage.read_json(f"{TRIALS_DIR}/{name}.json")
        except FileNotFoundError:
            return None

    def write_trial(self, name: str, record: dict) -> None:
        self.storage.write_json(f"{TRIALS_DIR}/{name}.json", record)

    def is_final(self, name: str) -> bool:
        """Whether the trial ended for good (finished, or stopped by the scheduler)."""
        return (self.trial(name) or {}).get("status") in FINAL


def check_compatible(plan, record: dict) -> list[str]:
    """Refuse a resume whose trials train something else; return the names of trials added since."""
    old = {t["name"]: t for t in record.get("trials", [])}
    new = {t.name: t for t in plan.trials}
    changed = [n for n in old if n in new and old[n]["config_hash"] != new[n].config_hash]
    removed = [n for n in old if n not in new]
    if changed or removed:
        what = "; ".join(filter(None, [f"changed: {', '.join(changed)}" if changed else "",
                                       f"removed: {', '.join(removed)}" if removed else ""]))
        raise DCDiTError(f"sweep {plan.name} was started with other trials ({what}); resuming would mix two "
                         "sweeps. Revert the sweep file, or start a new sweep with --name (train.steps, "
                         "checkpoint.*, logging.*, resources.* and max_concurrent_trials may change)")
    return [n for n in new if n not in old]


def progress(sweep_storage, name: str) -> dict[str, Any]:
    """How far trial `name` got, from its Train run's newest valid checkpoint: its step, URI and metrics (None,
    None and {} before the first checkpoint)."""
    latest = latest_checkpoint_state(sweep_storage.child(name))
    if not latest:
        return {"step": None, "checkpoint": None, "metrics": {}}
    dirname, state = latest
    return {"step": state.get("step"), "checkpoint": sweep_storage.join(name, dirname),
            "metrics": dict(state.get("metrics", {}))}


def recorded_history(tracker, run_id: str | None, metric: str | None) -> list[list]:
    """[[step, value], ...] of `metric` in MLflow run `run_id`, by step: what a trial's record keeps for the
    scheduler to replay on --resume ([] without a run or a metric)."""
    if not run_id or not metric:
        return []
    return [[m.step, m.value] for m in sorted(tracker.metric_history(run_id, metric), key=lambda m: m.step)]


def jsonable(value: Any) -> Any:
    """`value` as it reads back from a JSON record (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


__all__ = ["SweepState", "check_compatible", "progress", "recorded_history", "jsonable", "SWEEP_RECORD", "TRIALS_DIR",
           "TUNE_DIR", "FINISHED", "STOPPED", "FAILED", "INTERRUPTED", "PENDING", "FINAL"]
