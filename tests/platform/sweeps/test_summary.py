"""The sweep's summary without Ray: trials with records, trials a dead driver left half-trained (INTERRUPTED,
their MLflow runs KILLED) or never started (PENDING), and the table `dcdit sweep` prints."""

from __future__ import annotations

from dcdit_platform.runs import write_run_record
from dcdit_platform.sweeps.state import SweepState
from dcdit_platform.sweeps.summary import close_unfinished, format_table, summarize
from dcdit_platform.tracking import Tracker
from helpers.sweeps import save_trial_checkpoint

DONE, HALF, NEVER = "DC-DiT-tiny_N4_lam0.01", "DC-DiT-tiny_N4_lam0.1", "DiT-tiny_2"


def test_summary_reads_records_run_records_and_checkpoints(smoke_plan):
    state = SweepState(smoke_plan.sweep_storage)
    state.write_trial(DONE, {"name": DONE, "status": "FINISHED", "step": 4, "checkpoint": "ckpt-4",
                             "mlflow_run_id": "run-done", "metrics": {"train/loss": 0.25}, "evaluation": {"fid": 9.5},
                             "error": None, "resumed_from": None, "wall_s": 12.5})
    write_run_record(smoke_plan.sweep_storage, HALF, {"name": HALF, "mlflow_run_id": "run-half"})
    save_trial_checkpoint(smoke_plan, HALF, 2, {"train/loss": 0.5})

    summary = summarize(smoke_plan, state, "parent-run")
    assert (summary["name"], summary["mlflow_run_id"], summary["storage"]) == (
        "smoke-sweep", "parent-run", smoke_plan.sweep_storage.uri)
    done, half, never = summary["trials"]
    assert done == {"name": DONE, "kind": "dcdit", "status": "FINISHED", "step": 4, "checkpoint": "ckpt-4",
                    "mlflow_run_id": "run-done", "metrics": {"train/loss": 0.25}, "evaluation": {"fid": 9.5},
                    "wall_s": 12.5,
                    "overrides": {"model.downsample_factor": 4, "train.chunking.ratio_loss_weight": 0.01}}
    assert (half["status"], half["step"], half["mlflow_run_id"], half["metrics"]) == (
        "INTERRUPTED", 2, "run-half", {"train/loss": 0.5})
    assert half["checkpoint"] == smoke_plan.sweep_storage.join(HALF, "checkpoint_00000002")
    assert (never["status"], never["step"], never["checkpoint"], never["mlflow_run_id"], never["kind"]) == (
        "PENDING", None, None, None, "baseline")

    summary["status"] = "INTERRUPTED"
    assert format_table(summary).splitlines() == [
        f"sweep smoke-sweep: INTERRUPTED; MLflow parent run parent-run at {smoke_plan.display_tracking_uri} "
        "(experiment dcdit)",
        "trial                   status       step  train/loss  MLflow run",
        "DC-DiT-tiny_N4_lam0.01  FINISHED     4     0.2500      run-done",
        "DC-DiT-tiny_N4_lam0.1   INTERRUPTED  2     0.5000      run-half",
        "DiT-tiny_2              PENDING      -     -           -"]


def test_an_interrupted_trials_running_mlflow_run_is_killed(smoke_plan):
    tracker = Tracker(smoke_plan.tracking_uri)
    running = tracker.open_run(experiment="sweep-summary", run_name=HALF)
    finished = tracker.open_run(experiment="sweep-summary", run_name=DONE)
    tracker.finish(finished, "FINISHED")
    close_unfinished({"trials": [{"name": HALF, "status": "INTERRUPTED", "mlflow_run_id": running},
                                 {"name": DONE, "status": "INTERRUPTED", "mlflow_run_id": finished},
                                 {"name": NEVER, "status": "PENDING", "mlflow_run_id": None}]}, tracker)
    assert tracker.get_run(running).info.status == "KILLED"
    assert tracker.get_run(finished).info.status == "FINISHED"
