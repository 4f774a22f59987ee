"""MLflow's conventions and watching long work, against a real `mlflow server` over HTTP and a real embedded Ray:
one rule for the tracking URI of every command, params that apply to the run's architecture only, user and source
tags, stable keys of the default evaluation protocol (and reports reading old and new runs), protocols and training
data as dataset inputs, images with steps, system metrics, progress lines with ETAs, Ray's dashboard URL and its
internal log lines kept off the terminal, --quiet and --verbose."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from dcdit_platform import console
from dcdit_platform.cli import build_parser, main
from dcdit_platform.config import build_config
from dcdit_platform.console import format_duration
from dcdit_platform.evaluation.outputs import _tracking_uri, log_to_mlflow
from dcdit_platform.evaluation.progress import Progress
from dcdit_platform.evaluation.protocol import EvalConfig
from dcdit_platform.raycluster import API_SERVER_ENV, ray_session
from dcdit_platform.reports.collect import evaluations_of
from dcdit_platform.runs import open_checkpoint
from dcdit_platform.sweeps import load_sweep
from dcdit_platform.tracking import Tracker, resolve_tracking_uri
from dcdit_platform.training import plan_run, run_local
from dcdit_platform.training.driver import open_run
from helpers.evaluation import tiny_checkpoint
from helpers.reports import log_evaluation
from helpers.training import DIT, tiny_config
from PIL import Image

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_a_new_sqlite_store_is_created_quietly(tmp_path, capfd):
    Tracker(f"sqlite:///{tmp_path}/quiet.db").experiment_id("dcdit")
    assert "database tables" not in capfd.readouterr().err


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


def _summary(slug: str, fd: float, **changes) -> dict:
    """What `evaluate` hands `log_to_mlflow`: the protocol record and the metrics of one evaluation."""
    return {"slug": slug, "checkpoint": "ckpt", "num_samples": 16, "sampler": "ddim", "steps": 2, "cfg_scale": 1.0,
            "cfg_channels": None, "lite_cfg": False, "seed": 0, "num_classes": 4, "batch_size": 2, "shard_size": 4,
            "extractor": "dcdit-synthetic-classifier", "weights_sha256": "abc", "reference": "synthetic",
            "reference_id": "synthetic:seed=0", "vae": None, "image_size": 8, "ema": True, "rho": None, "step": 10,
            "fd": fd, "kd_mean": fd / 10, **changes}


def test_the_default_protocol_has_stable_keys_and_reports_read_both_layouts(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server.uri)
    run_id = tracker.open_run(experiment="conventions-eval", run_name="evaluated")
    ckpt = open_checkpoint(str(tiny_checkpoint(tmp_path, run_name="evaluated", mlflow_run_id=run_id)))
    cfg = EvalConfig(checkpoint=ckpt.uri, tracking_uri=mlflow_server.uri)
    grid = tmp_path / "samples.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(grid)
    first, other, swept = "n16-ddim2-cfg1-domain-aaaaaa", "n32-ddim2-cfg1-domain-bbbbbb", "n16-ddim2-cfg1-cccccc"
    for slug, summary in ((first, _summary(first, 1.25)), (other, _summary(other, 2.5, num_samples=32)),
                          (first, _summary(first, 1.25)),  # evaluated again: still the default
                          (swept, _summary(swept, 3.0, rho=0.5))):  # a tail-dropped model never claims it
        assert log_to_mlflow(cfg, ckpt, slug, summary, [grid], echo=lambda _: None)
    run = tracker.get_run(run_id)
    metrics, params = run.data.metrics, run.data.params
    assert run.data.tags["dcdit.eval_protocol"] == first and params["eval/protocol"] == first
    assert metrics["eval/fd"] == 1.25 and metrics["eval/kd_mean"] == 0.125 and params["eval/num_samples"] == "16"
    assert metrics[f"eval/{other}/fd"] == 2.5 and params[f"eval/{other}/num_samples"] == "32"
    assert metrics[f"eval/{swept}/fd"] == 3.0 and not any(k.startswith(f"eval/{first}/") for k in metrics)
    # Each protocol is a dataset input of the run (name = slug, digest = the slug's protocol hash).
    inputs = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert inputs == {(first, "aaaaaa", "evaluation"), (other, "bbbbbb", "evaluation"),
                      (swept, "cccccc", "evaluation")}
    # Figures are images with a key and the checkpoint's step (the UI's step slider), and artifacts as before.
    images = [a.path for a in tracker.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    # (MLflow files them as images/<key with / as ~>+step+<step>+timestamp+...)
    assert any(p.startswith(f"images/eval~{first}~samples+step+10+") for p in images), images
    assert [a.path for a in tracker.list_artifacts(run_id, f"eval/{first}")] == [
        f"eval/{first}/result.json", f"eval/{first}/samples.png"]

    found = {(e.slug, e.rho): e for e in evaluations_of(run)}
    assert set(found) == {(first, None), (other, None), (swept, 0.5)}
    assert found[(first, None)].metrics == {"fd": 1.25, "kd_mean": 0.125}
    assert found[(first, None)].protocol["num_samples"] == "16" and found[(other, None)].protocol["num_samples"] == "32"
    # A run evaluated before stable keys (no eval_protocol tag) reads as it always did.
    old = tracker.open_run(experiment="conventions-eval", run_name="old")
    log_evaluation(tracker, old, first, _summary(first, 4.0), {"fd": 4.0}, step=10)
    assert [(e.slug, e.metrics["fd"]) for e in evaluations_of(tracker.get_run(old))] == [(first, 4.0)]


def test_a_training_run_logs_system_metrics_and_its_dataset(mlflow_server, tmp_path, capsys):
    """4 steps take less than the monitor's 10 s interval: the samples taken are logged when the run ends."""
    config = build_config(tiny_config(storage={"uri": str(tmp_path)}, train={"steps": 4},
                                      logging={"every": 1, "artifacts_every": -1},
                                      tracking={"uri": mlflow_server.uri, "experiment": "conventions"}))
    summary = run_local(plan_run(config, name="system"))
    progress = [line for line in capsys.readouterr().err.splitlines() if "[system] step" in line]
    assert len(progress) == 4 and all("ETA" in line for line in progress[:3]) and "ETA" not in progress[3]
    run = Tracker(mlflow_server.uri).get_run(summary["mlflow_run_id"])
    host = socket.gethostname()
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/{host}/{name}" in run.data.metrics, sorted(run.data.metrics)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]  # stopped with the run
    # The synthetic data, by its generator's settings (tiny_config's data section), as the training input.
    source = "synthetic:seed=3,image_size=8,num_classes=4,num_samples=256"  # the data seed is the run seed
    (entry,) = run.inputs.dataset_inputs
    assert (entry.dataset.name, entry.dataset.digest) == ("synthetic", hashlib.sha256(source.encode()).hexdigest()[:16])
    assert json.loads(entry.dataset.source) == {"uri": source} and entry.tags[0].value == "training"


def test_progress_lines_count_tenths_and_estimate_what_is_left():
    now = [100.0]
    lines, updates = [], []
    progress = Progress(40, "samples:", lines.append, on_update=lambda done, eta: updates.append((done, eta)),
                        clock=lambda: now[0])
    for _ in range(4):  # 4 shards of 10 in 30 s each: 25% per shard, 30 s per 10 samples
        now[0] += 30.0
        progress.advance(10)
    assert lines == ["samples: 10/40 (25%), ETA 1 min 30 s", "samples: 20/40 (50%), ETA 1 min 00 s",
                     "samples: 30/40 (75%), ETA 30 s", "samples: 40/40 (100%) in 2 min 00 s"]
    assert updates == [(10, 90.0), (20, 60.0), (30, 30.0), (40, 0.0)]
    many = []
    progress = Progress(1000, "x", many.append, clock=lambda: now[0])
    for _ in range(1000):
        progress.advance(1)
    assert len(many) == 10  # one line per tenth, however small the pieces
    assert [format_duration(s) for s in (0.4, 59.4, 61, 3599, 3600, 7500)] == [
        "0 s", "59 s", "1 min 01 s", "59 min 59 s", "1 h 00 min", "2 h 05 min"]


RAY_LINE = ("[2026-11-30 14:18:07,293 E 3349 3408] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
            "has constructor arguments in the object store and max_restarts > 0.")


def test_an_embedded_ray_names_its_dashboard_and_keeps_its_own_log_lines_off_the_terminal(capfd):
    """A real embedded Ray (ray_session, as every command starts it): its dashboard's URL is printed, a worker's
    own output reaches the terminal, and Ray's C++ log lines stay in the session's worker-*.err files."""
    @ray.remote
    def speak(marker: str) -> None:
        print(RAY_LINE, file=sys.stderr, flush=True)
        print("Reporting training result 1: TrainingReport(checkpoint=None, metrics={})", file=sys.stderr, flush=True)
        print(marker, file=sys.stderr, flush=True)

    with ray_session(num_cpus=1, dashboard=True):
        url = os.environ[API_SERVER_ENV]
        ray.get(speak.remote("dcdit-worker-line-1"))
        seen, deadline = "", time.monotonic() + 120
        while "dcdit-worker-line-1" not in seen:  # forwarded asynchronously: wait for it, in order after RAY_LINE
            assert time.monotonic() < deadline, seen
            seen += capfd.readouterr().err
            time.sleep(0.1)
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        kept = [f for f in logs.glob("worker-*.err") if RAY_LINE in f.read_text(errors="replace")]
    assert f"dcdit: Ray dashboard at {url} (while this command runs)" in seen
    assert "core_worker.cc" not in seen and "TrainingReport" not in seen and kept


def test_quiet_and_verbose_are_every_commands_flags(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert all({"--quiet", "--verbose"} <= set(p._option_string_actions) for p in commands.values())
    try:
        assert main(["flops", "DiT-S/2", "--quiet"]) == 0 and console.is_quiet()
        console.echo("flops")("a progress line")
        console.warn("flops", "a warning")
        err = capsys.readouterr().err
        assert "a progress line" not in err and "dcdit flops: warning: a warning" in err  # warnings stay
        assert main(["flops", "DiT-S/2", "--verbose"]) == 0 and console.is_verbose() and not console.is_quiet()
        console.echo("flops")("a progress line")
        assert "dcdit flops: a progress line" in capsys.readouterr().err
        with pytest.raises(SystemExit):  # one or the other
            main(["flops", "DiT-S/2", "--quiet", "--verbose"])
    finally:
        console.set_verbosity()
