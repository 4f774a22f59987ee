"""MLflow's conventions, against a real `mlflow server` over HTTP: one rule for the tracking URI of every command
(flag > experiment > MLFLOW_TRACKING_URI > the storage's SQLite), params that apply to the run's architecture only
(the compare view lines DiT and DC-DiT runs up), and MLflow's own user and source tags."""

from __future__ import annotations

import getpass
from pathlib import Path

from dcdit_platform.config import build_config
from dcdit_platform.evaluation.outputs import _tracking_uri
from dcdit_platform.evaluation.protocol import EvalConfig
from dcdit_platform.sweeps import load_sweep
from dcdit_platform.tracking import resolve_tracking_uri
from dcdit_platform.training import plan_run
from dcdit_platform.training.driver import open_run
from helpers.training import DIT, tiny_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_every_command_resolves_the_tracking_uri_by_one_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = str(tmp_path / "runs")
    default = f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert resolve_tracking_uri(None, store) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(None, store) == "http://tracking.example:5000"
    assert resolve_tracking_uri("http://flag:1", store) == "http://flag:1"

    # dcdit train / resume: the environment unless the flag (which sets tracking.uri) or the experiment says
    config = build_config(tiny_config(storage={"uri": store}))
    assert plan_run(config, name="env").tracking_uri == "http://tracking.example:5000"
    flagged = build_config(tiny_config(storage={"uri": store}, tracking={"uri": "http://flag:1"}))
    assert plan_run(flagged, name="flag").tracking_uri == "http://flag:1"
    # dcdit sweep: every trial and the parent alike
    sweep_file = EXPERIMENTS / "smoke-sweep.yaml"
    plan = load_sweep(sweep_file, storage=store)
    assert plan.tracking_uri == "http://tracking.example:5000"
    assert {t.config.tracking.uri for t in plan.trials} == {"http://tracking.example:5000"}
    assert load_sweep(sweep_file, storage=store, tracking_uri="http://flag:1").tracking_uri == "http://flag:1"
    # dcdit eval: --tracking-uri, else the run's own, else the environment, else the run's storage
    eval_cfg = EvalConfig(checkpoint="x")
    assert _tracking_uri(eval_cfg, config) == "http://tracking.example:5000"
    assert _tracking_uri(eval_cfg, flagged) == "http://flag:1"
    assert _tracking_uri(EvalConfig(checkpoint="x", tracking_uri="http://other:2"), flagged) == "http://other:2"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _tracking_uri(eval_cfg, config) == default


# What a DiT run reads (hand-listed from DiT's constructor and the optimiser): nothing of the router, the ratio loss
# or upcycling, which its parallel-coordinates line would otherwise show at a DC-DiT's defaults.
DIT_MODEL_PARAMS = {"arch", "depth", "hidden_size", "num_heads", "input_size", "in_channels", "num_classes",
                    "learn_sigma", "class_dropout_prob", "mlp_ratio", "patch_size"}
DIT_TRAIN_PARAMS = {"steps", "global_batch", "grad_accum", "lr", "warmup_steps", "weight_decay", "betas", "eps",
                    "ema_decay", "grad_clip", "precision"}


def test_params_apply_to_the_architecture_and_runs_carry_user_and_source(mlflow_server, tmp_path):
    opened = {}
    for name, model in (("dit", DIT), ("dcdit", None)):
        tree = tiny_config(storage={"uri": str(tmp_path)}, tracking={"uri": mlflow_server.uri,
                                                                      "experiment": "conventions"})
        if model:
            tree["model"] = dict(model)
        config = build_config(tree)
        opened[name] = open_run(plan_run(config, name=f"params-{name}"), echo=lambda _: None)
    dit = opened["dit"].tracker.get_run(opened["dit"].run_id)
    params = dit.data.params
    assert {k.split(".", 1)[1] for k in params if k.startswith("model.")} == DIT_MODEL_PARAMS
    assert {k.split(".", 1)[1] for k in params if k.startswith("train.")} == DIT_TRAIN_PARAMS
    dcdit = opened["dcdit"].tracker.get_run(opened["dcdit"].run_id).data.params
    assert dcdit["model.downsample_factor"] == "4.0" and "train.chunking.ratio_loss_weight" in dcdit
    assert "model.patch_size" not in dcdit and "train.distill_steps" not in dcdit
    assert dit.data.tags["mlflow.user"] == getpass.getuser()
    assert dit.data.tags["mlflow.source.type"] == "LOCAL" and dit.data.tags["mlflow.source.name"]
