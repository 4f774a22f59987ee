"""Trained models in MLflow against a real `mlflow server` over HTTP: a tiny run trained here logs its final EMA
weights as its LoggedModel (linked to the run, its params and metrics; the artifact is the `dcdit export`
directory); `dcdit register` versions it; a fresh process's `mlflow.pyfunc.load_model("models:/NAME/1").predict`
draws byte for byte what `dcdit sample` writes; a checkpoint without a model is logged on registration; one-line
errors; tracking.log_model: false."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlflow.artifacts
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from dcdit_platform import mlflow_model
from dcdit_platform.cli import main
from dcdit_platform.config import build_config
from dcdit_platform.raycluster import free_port
from dcdit_platform.training import plan_run, run_local
from helpers.training import load_weights, tiny_config

FAST = ["--sampler", "ddim", "--steps", "4"]


@pytest.fixture(scope="module")
def run(mlflow_server, tmp_path_factory):
    """An 8-step DC-DiT run 'tiny' tracked by the server, checkpoints at steps 4 and 8 (the model logged at its end
    is step 8's). Returns (storage root, summary)."""
    root = str(tmp_path_factory.mktemp("store"))
    config = build_config(tiny_config(storage={"uri": root}, train={"steps": 8}, tracking={"uri": mlflow_server.uri}))
    return root, run_local(plan_run(config, name="tiny"))


def run_models(client: MlflowClient, run_id: str) -> list:
    outputs = client.get_run(run_id).outputs
    return [client.get_logged_model(o.model_id) for o in (outputs.model_outputs if outputs else [])]


def call(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_training_logs_its_final_ema_weights_as_the_runs_model(run, mlflow_server, tmp_path, monkeypatch):
    root, summary = run
    client = MlflowClient(mlflow_server.uri)
    run_id = summary["mlflow_run_id"]
    (model,) = run_models(client, run_id)
    assert (model.source_run_id, model.status.to_proto(), model.tags["dcdit.step"]) == (run_id, 2, "8")  # READY
    assert model.params["train.steps"] == "8" and model.params["model.arch"] == "dcdit"  # the run's params
    linked = {m.key: m for m in model.metrics}
    history = client.get_metric_history(run_id, "train/loss")
    assert linked["train/loss"].step == 8 and linked["train/loss"].value == max(history, key=lambda m: m.step).value
    assert len(history) == 8  # linking did not add points to the run's own history
    # The artifact is the export directory, holding exactly the final checkpoint's EMA weights.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # MLflow's models:/ resolution reads it
    local = mlflow.artifacts.download_artifacts(f"models:/{model.model_id}", dst_path=str(tmp_path))
    exported = load_file(f"{local}/artifacts/export/model.safetensors")
    _, ema = load_weights(f"{root}/tiny/checkpoint_00000008")
    assert exported.keys() == {k.removeprefix("module.") for k in ema}
    assert all(np.array_equal(exported[k.removeprefix("module.")].numpy(), v.numpy()) for k, v in ema.items())


def test_registered_model_in_a_fresh_process_draws_what_dcdit_sample_draws(run, mlflow_server, tmp_path, capsys,
                                                                            monkeypatch):
    root, summary = run
    code, out, _ = call(capsys, "register", f"{root}/tiny", "--name", "tiny-dcdit", "--tracking-uri",
                        mlflow_server.uri, "--json")
    assert code == 0 and out.splitlines()[0] == "models:/tiny-dcdit/1"
    registered = json.loads(out.splitlines()[-1])
    (model,) = run_models(MlflowClient(mlflow_server.uri), summary["mlflow_run_id"])
    assert (registered["model_id"], registered["logged_now"], registered["step"]) == (model.model_id, False, 8)
    # dcdit sample from the checkpoint and from the registered model (MLFLOW_TRACKING_URI, as MLflow's clients).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    for src, out_dir in ((f"{root}/tiny", "ckpt"), ("models:/tiny-dcdit/1", "reg")):
        assert main(["sample", src, "--class", "1", "3", "--per-class", "2", "--out", str(tmp_path / out_dir),
                     *FAST]) == 0
        assert main(["sample", src, "--class", "2", "--lite-cfg", "--cfg-scale", "2", "--out",
                     str(tmp_path / f"{out_dir}-cfg"), *FAST]) == 0
    script = textwrap.dedent("""
        import sys, mlflow.pyfunc, numpy as np, pandas as pd
        model = mlflow.pyfunc.load_model("models:/tiny-dcdit/1")
        plain = model.predict(pd.DataFrame({"class": [1, 3, 1, 3], "seed": [0, 1, 1, 0]}),
                              params={"sampler": "ddim", "steps": 4})
        guided = model.predict(pd.DataFrame({"class": [2]}),
                               params={"sampler": "ddim", "steps": 4, "lite_cfg": True, "cfg_scale": 2.0})
        np.savez(sys.argv[1], plain=plain, guided=guided)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pyfunc.npz")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    drawn = np.load(tmp_path / "pyfunc.npz")
    assert drawn["plain"].dtype == np.uint8 and drawn["plain"].shape == (4, 8, 8, 3)
    for k, (label, seed) in enumerate([(1, 0), (3, 1), (1, 1), (3, 0)]):
        png = np.asarray(Image.open(tmp_path / "ckpt" / f"class{label:04d}_seed{seed}.png"))
        assert np.array_equal(drawn["plain"][k], png), (label, seed)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "reg" / f"class{label:04d}_seed{seed}.png")), png)
    guided_png = np.asarray(Image.open(tmp_path / "ckpt-cfg" / "class0002_seed0.png"))
    assert np.array_equal(drawn["guided"][0], guided_png)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "reg-cfg" / "class0002_seed0.png")), guided_png)
    assert not np.array_equal(drawn["plain"][0], drawn["plain"][2])  # seeds differ


def test_register_logs_a_model_for_a_checkpoint_without_one(run, mlflow_server, capsys):
    root, summary = run
    for version in (1, 2):  # step 4's checkpoint, which has no model (training logged step 8's)
        # The first finds the server by the run's tracking.uri, the second by the flag.
        flag = ["--tracking-uri", mlflow_server.uri] if version == 2 else []
        code, out, _ = call(capsys, "register", f"{root}/tiny/checkpoint_00000004", "--name", "tiny-step4", *flag,
                            "--json")
        assert code == 0 and out.splitlines()[0] == f"models:/tiny-step4/{version}"
        registered = json.loads(out.splitlines()[-1])
        assert registered["logged_now"] == (version == 1)  # the second registration reuses the model logged first
    models = {m.tags["dcdit.step"]: m for m in run_models(MlflowClient(mlflow_server.uri), summary["mlflow_run_id"])}
    assert sorted(models) == ["4", "8"] and models["4"].model_id == registered["model_id"]
    model = models["4"]
    versions = [MlflowClient(mlflow_server.uri).get_model_version("tiny-step4", str(v)) for v in (1, 2)]
    assert [v.source for v in versions] == [model.artifact_location] * 2


def test_bad_input_is_one_line(run, mlflow_server, tmp_path, capsys, monkeypatch):
    root, _ = run
    monkeypatch.setattr(mlflow_model, "REGISTER_TIMEOUT_S", 0.0)
    cases = [
        (["register", "missing-run", "--storage", root, "--name", "x", "--tracking-uri", mlflow_server.uri],
         "no checkpoint, run or export at 'missing-run'"),
        (["register", f"{root}/tiny", "--name", "x", "--tracking-uri", f"http://127.0.0.1:{free_port()}"],
         "unreachable"),
        (["register", f"{root}/tiny", "--name", "x", "--tracking-uri", f"sqlite:///{tmp_path}/other.db"],
         "belongs to MLflow run"),  # a store that does not hold the run
    ]
    for args, message in cases:
        code, _, err = call(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
        assert err.startswith(f"dcdit {args[0]}: error:")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    code, _, err = call(capsys, "sample", "models:/no-such-model/1", "--class", "1", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no-such-model" in err, err


def test_tracking_log_model_false_logs_none(mlflow_server, tmp_path):
    config = build_config(tiny_config(storage={"uri": str(tmp_path)}, train={"steps": 2}, checkpoint={"every": 2},
                                      tracking={"uri": mlflow_server.uri, "log_model": False}))
    summary = run_local(plan_run(config, name="nolog"))
    assert summary["status"] == "FINISHED" and summary["step"] == 2
    assert run_models(MlflowClient(mlflow_server.uri), summary["mlflow_run_id"]) == []
