"""The driver's books as Tune reports trial events, without Ray: what `SweepCallback.trial_ended` records for a
trial that fails for good or is stopped by the scheduler (from its Train run's newest checkpoint), when a stop
counts as finished, and the MLflow status it gives the trial's run."""

from __future__ import annotations

from dcdit_platform.runs import write_run_record
from dcdit_platform.sweeps.state import SweepState
from dcdit_platform.sweeps.tuner import SweepCallback
from dcdit_platform.tracking import Tracker
from helpers.sweeps import save_trial_checkpoint

TRIAL = "DC-DiT-tiny_N4_lam0.1"  # 4 steps, a checkpoint every 2


def callback(plan, lines: list[str], replayed: set[str] = frozenset()) -> SweepCallback:
    return SweepCallback(plan, Tracker(plan.tracking_uri), SweepState(plan.sweep_storage), lines.append,
                         replayed=set(replayed))


def test_a_trial_that_fails_before_any_checkpoint_is_recorded_failed(smoke_plan):
    lines: list[str] = []
    callback(smoke_plan, lines).trial_ended(TRIAL, "DataError: shard 3 is missing")
    record = SweepState(smoke_plan.sweep_storage).trial(TRIAL)
    assert {k: record[k] for k in ("status", "step", "checkpoint", "mlflow_run_id", "metrics", "error", "history")} \
        == {"status": "FAILED", "step": None, "checkpoint": None, "mlflow_run_id": None, "metrics": {},
            "error": "DataError: shard 3 is missing", "history": []}
    assert lines == [f"trial {TRIAL} failed: DataError: shard 3 is missing"]


def test_a_stop_before_the_last_step_is_early_stopping_and_at_it_is_finishing(smoke_plan):
    lines: list[str] = []
    books = callback(smoke_plan, lines)
    save_trial_checkpoint(smoke_plan, TRIAL, 2, {"train/loss": 0.5})
    books.trial_ended(TRIAL, None)
    state = SweepState(smoke_plan.sweep_storage)
    record = state.trial(TRIAL)
    assert (record["status"], record["step"], record["metrics"]) == ("STOPPED", 2, {"train/loss": 0.5})
    assert record["checkpoint"] == smoke_plan.sweep_storage.join(TRIAL, "checkpoint_00000002")
    assert lines[-1] == f"trial {TRIAL} stopped early by the scheduler at step 2"

    other = "DiT-tiny_2"
    save_trial_checkpoint(smoke_plan, other, 4, {"train/loss": 0.25})
    books.trial_ended(other, None)
    assert (state.trial(other)["status"], state.trial(other)["step"]) == ("FINISHED", 4)
    assert lines[-1] == f"trial {other} finished at step 4"


def test_a_trial_that_recorded_its_own_end_is_left_as_it_is(smoke_plan):
    state = SweepState(smoke_plan.sweep_storage)
    record = {"name": TRIAL, "status": "FINISHED", "step": 4, "metrics": {"train/loss": 0.123456}}
    state.write_trial(TRIAL, record)
    lines: list[str] = []
    callback(smoke_plan, lines).trial_ended(TRIAL, None)
    callback(smoke_plan, lines, replayed={TRIAL}).trial_ended(TRIAL, None)  # done before: says nothing
    assert state.trial(TRIAL) == record
    assert lines == [f"trial {TRIAL} finished at step 4, train/loss 0.1235"]


def test_a_failed_trials_mlflow_run_is_marked_failed_with_the_error(smoke_plan):
    tracker = Tracker(smoke_plan.tracking_uri)
    run_id = tracker.open_run(experiment="sweep-books", run_name=TRIAL)
    write_run_record(smoke_plan.sweep_storage, TRIAL, {"name": TRIAL, "mlflow_run_id": run_id})
    callback(smoke_plan, []).trial_ended(TRIAL, "worker died")
    run = tracker.get_run(run_id)
    assert run.info.status == "FAILED"
    assert (run.data.tags["dcdit.sweep.status"], run.data.tags["dcdit.error"]) == ("FAILED", "worker died")
    assert SweepState(smoke_plan.sweep_storage).trial(TRIAL)["mlflow_run_id"] == run_id
