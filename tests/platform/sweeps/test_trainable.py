"""What a Tune trial is given, without Ray: the `TrialContext` rebuilds each trial's config exactly as the driver
planned it (as a child of the sweep's run), survives the object store (pickling), and turns the sweep's protocol
into the `EvalRequest` of a checkpoint."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

from dcdit_platform.sweeps import load_sweep
from dcdit_platform.sweeps.trainable import TrialContext

EXPERIMENTS = Path(__file__).resolve().parents[3] / "experiments"


def test_trial_context_rebuilds_every_trials_config_as_a_child_of_the_sweep(smoke_plan, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    context = pickle.loads(pickle.dumps(TrialContext.of(smoke_plan, "parent-run-1")))  # as Tune hands it over
    assert context.env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and context.env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert list(context.trees) == ["DC-DiT-tiny_N4_lam0.01", "DC-DiT-tiny_N4_lam0.1", "DiT-tiny_2"]
    for trial in smoke_plan.trials:
        config = context.trial_config(trial.name)
        assert config.tracking.parent_run_id == "parent-run-1"
        assert config.tracking.uri == smoke_plan.tracking_uri
        assert config.tracking.tags["dcdit.trial"] == trial.name
        # The trial trains what the driver planned and recorded in sweep.json: only the parent run id is new.
        assert config.config_hash() == trial.config_hash
        planned = dataclasses.replace(trial.config, tracking=dataclasses.replace(trial.config.tracking,
                                                                                   parent_run_id="parent-run-1"))
        assert config.to_dict() == planned.to_dict()
    assert context.evaluation is None and context.scheduler_metric is None
    assert context.sweep_state().storage.uri == smoke_plan.sweep_storage.uri


def test_trial_context_carries_the_scheduler_metric_and_the_evaluation_protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"_base_: {EXPERIMENTS / 'quickstart' / 'sweep.yaml'}\nscheduler: {{type: asha, metric: "
                     "train/ratio_loss}\n")
    plan = load_sweep(sweep, storage=str(tmp_path / "runs"))
    context = TrialContext.of(plan, "parent-run-2")
    assert context.scheduler_metric == "train/ratio_loss"
    # The quickstart's protocol, with the evaluator's workers defaulting to the trial's (1 x 0.95 CPU).
    assert context.evaluation["num_samples"] == 256 and context.evaluation["sampler"] == "ddim"
    assert (context.evaluation["workers"], context.evaluation["cpus_per_worker"]) == (1, 0.95)

    request = pickle.loads(pickle.dumps(context.eval_request("/runs/quickstart/DiT-tiny_2/checkpoint_00000004")))
    config = request.config
    assert config.checkpoint == "/runs/quickstart/DiT-tiny_2/checkpoint_00000004"
    assert (config.storage, config.tracking_uri, config.track) == (plan.sweep_storage.uri, plan.tracking_uri, True)
    assert (config.extractor, config.num_samples, config.sample_steps, config.workers) == (
        "dcdit-synthetic-classifier", 256, 25, 1)
    assert list(config.metrics) == ["fid", "kid", "pr"]
    assert request.env == context.env
    config.validate()
