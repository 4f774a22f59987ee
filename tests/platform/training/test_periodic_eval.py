"""Evaluation during training (`evaluation.every`): which steps are scored (resumed runs included), the checks of
the `evaluation:` section, and one tiny run on a real local Ray cluster whose background evaluations reach a real
`mlflow server` as eval/fd at their steps while training goes on; a failed evaluation is a warning only.

The module trains one tiny run in this process (its evaluations are Ray tasks), resumes it once, and runs one more
with an evaluation that must fail: a few seconds of training, the rest is the evaluations' Ray workers."""

from __future__ import annotations

import logging
import math
import uuid

import pytest
from dcdit.errors import DCDiTError
from dcdit_platform.config import build_config
from dcdit_platform.tracking import Tracker
from dcdit_platform.training import plan_run, run_local
from dcdit_platform.training.periodic_eval import evaluation_steps
from helpers.training import steps_logged, tiny_config

# --- the schedule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every,start,steps,expected", [
    (4, 0, 12, [4, 8, 12]),
    (4, 0, 10, [4, 8, 10]),  # the last step is always scored: it is the run's result
    (4, 4, 12, [8, 12]),  # resumed from step 4, whose evaluation was launched by the start that saved it
    (4, 8, 10, [10]),
    (8, 8, 16, [16]),
    (4, 12, 12, []),  # a finished run trains (and evaluates) nothing more
    (4, 12, 20, [16, 20]),  # raising train.steps and resuming continues the schedule
    (0, 0, 12, []),  # off
])
def test_evaluation_steps(every, start, steps, expected):
    assert evaluation_steps(every, start, steps) == expected


# --- the config section ------------------------------------------------------------------------------------------


def test_evaluation_settings_may_change_on_resume():
    """`evaluation` is resume-free: turning it on keeps the config hash (a run may start evaluating later)."""
    off = build_config(tiny_config())
    on = build_config(tiny_config(evaluation={"every": 8, "num_samples": 64}))
    assert on.evaluation.every == 8 and off.evaluation.every == 0
    assert on.config_hash() == off.config_hash()


@pytest.mark.parametrize("section,match", [
    ({"every": 6}, r"evaluation.every=6 must be a multiple of checkpoint.every=4 \(an evaluation scores a saved "
                   r"checkpoint\); use 8 or 0 \(off\)"),
    ({"every": -4}, r"evaluation.every=-4 must be in \[0, 1000000000\]"),
    ({"evry": 4}, r"unknown config key 'evaluation.evry' \(did you mean 'every'\?\)"),
    ({"every": 4, "num_sample": 8}, r"unknown config key 'evaluation.num_sample' \(did you mean 'num_samples'\?\)"),
])
def test_bad_evaluation_section(section, match):
    with pytest.raises(DCDiTError, match=match):
        build_config(tiny_config(evaluation=section))


@pytest.mark.parametrize("section,match", [
    ({"sample_steps": 0}, r"^evaluation.sample_steps must be >= 1, got 0$"),
    ({"sampler": "euler"}, r"^evaluation.sampler must be 'ddpm' or 'ddim', got 'euler'$"),
    ({"batch_size": 8, "shard_size": 12}, r"^evaluation.shard_size \(12\) must be a positive multiple of "
                                          r"evaluation.batch_size \(8\)$"),
])
def test_bad_protocol_is_refused_before_the_run_starts(tmp_path, section, match):
    """The protocol is `dcdit eval`'s, checked by it when the run is planned; the message names the config key."""
    config = build_config(tiny_config(storage={"uri": str(tmp_path)}, evaluation={"every": 4, **section}))
    with pytest.raises(DCDiTError, match=match):
        plan_run(config, name="bad-protocol")
    assert not (tmp_path / "bad-protocol").exists()


# --- a run on a real Ray cluster and MLflow server ---------------------------------------------------------------

EVALUATION = {"every": 4, "num_samples": 16, "sampler": "ddim", "sample_steps": 2, "batch_size": 8,
              "shard_size": 16, "workers": 1, "cpus_per_worker": 0.5}


def _train(tmp_path, mlflow_server, name: str, steps: int, evaluation: dict, experiment: str) -> dict:
    config = build_config(tiny_config(
        storage={"uri": str(tmp_path / "runs")}, train={"steps": steps},
        resources={"num_workers": 1}, evaluation=evaluation,
        tracking={"uri": mlflow_server.uri, "experiment": experiment}))
    return run_local(plan_run(config, name=name))


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, ray_cluster, mlflow_server):
    """8 steps with an evaluation every 4, then resumed to 12: (first summary, resumed summary)."""
    tmp = tmp_path_factory.mktemp("periodic-eval")
    experiment = f"periodic-eval-{uuid.uuid4().hex[:6]}"
    first = _train(tmp, mlflow_server, "evaluated", 8, EVALUATION, experiment)
    resumed = _train(tmp, mlflow_server, "evaluated", 12, EVALUATION, experiment)
    return first, resumed


def test_eval_fd_reaches_mlflow_at_each_evaluated_step(evaluated_run, mlflow_server):
    first, resumed = evaluated_run
    assert first["status"] == resumed["status"] == "FINISHED"
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    tracker = Tracker(mlflow_server.uri)
    run_id = first["mlflow_run_id"]
    # 4 and 8 by the first start, 12 by the resumed one; none twice (MLflow keeps a value per call).
    assert steps_logged(tracker, run_id, "eval/fd") == [4, 8, 12]
    assert all(m.value > 0 and math.isfinite(m.value) for m in tracker.metric_history(run_id, "eval/fd"))
    assert steps_logged(tracker, run_id, "train/loss") == list(range(1, 13))
    # The run's result carries its last score, at the last step.
    assert first["metrics"]["eval/step"] == 8 and resumed["metrics"]["eval/step"] == 12
    history = {m.step: m.value for m in tracker.metric_history(run_id, "eval/fd")}
    assert resumed["metrics"]["eval/fd"] == pytest.approx(history[12])
    # Every evaluation scored a saved checkpoint's EMA weights under the run's protocol.
    params = tracker.get_run(run_id).data.params
    assert params["eval/num_samples"] == "16" and params["eval/ema"] == "True"


def test_training_goes_on_while_an_evaluation_runs(evaluated_run, mlflow_server):
    """eval/lag_steps: the steps trained between an evaluation's launch (its checkpoint saved) and its result.
    Step 4's evaluation started a Ray task, loaded its checkpoint and sampled; training did not wait for it. The
    last step's evaluation is waited for at the end (nothing is left to train)."""
    first, _ = evaluated_run
    lag = {m.step: m.value for m in Tracker(mlflow_server.uri).metric_history(first["mlflow_run_id"],
                                                                                "eval/lag_steps")}
    assert sorted(lag) == [4, 8, 12]
    assert lag[4] >= 1, lag
    assert lag[8] == 0 and lag[12] == 0


def test_a_failed_evaluation_is_a_warning_and_training_finishes(tmp_path, ray_cluster, mlflow_server, caplog):
    evaluation = {**EVALUATION, "reference": str(tmp_path / "missing.npz")}
    with caplog.at_level(logging.WARNING, logger="dcdit.train"):
        summary = _train(tmp_path, mlflow_server, "eval-fails", 4, evaluation, f"eval-fails-{uuid.uuid4().hex[:6]}")
    assert summary["status"] == "FINISHED" and summary["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if "evaluation of step" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("[eval-fails] the evaluation of step 4 failed: "), warnings
    assert "missing.npz" in warnings[0] and "\n" not in warnings[0], warnings
    assert "eval/fd" not in summary["metrics"]
    assert steps_logged(Tracker(mlflow_server.uri), summary["mlflow_run_id"], "eval/fd") == []
