"""The distributed evaluator on a real local Ray cluster: `dcdit eval --json` (metrics, protocol, ADM npz export,
MLflow), worker-count invariance, a killed actor's shards recomputed identically (Ray Data restarts it), the
missing-weights error, stale-cache protection, and the domain extractor with a Lite-CFG tail-drop sweep on a DC-DiT.

Tiny models, 8x8 images, 8 samples and 2 sampling steps: the compat Inception at 299x299 costs ~0.1-0.3 s per
image on this CPU, and its 2048-dimensional FID a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import threading

import numpy as np
import psutil
import pytest

from dcdit.data.synthetic import render
from dcdit.errors import DCDiTError
from dcdit.features import DOMAIN_EXTRACTOR, INCEPTION_WEIGHTS_FILE, build_extractor, file_sha256
from dcdit.generate import sample_labels
from dcdit.metrics import FeatureStats
from dcdit.models import forward_macs
from dcdit_platform.cli import main
from dcdit_platform.evaluation import EvalConfig, domain_classifier_path, evaluate
from dcdit_platform.evaluation.extractors import ExtractorSpec
from dcdit_platform.evaluation.references import reference_key
from dcdit_platform.evaluation.sources import dataset_source
from dcdit_platform.runs import open_checkpoint
from dcdit_platform.storage import open_storage
from dcdit_platform.tracking import Tracker, default_tracking_uri
from helpers.evaluation import tiny_checkpoint, write_png_folder

# One protocol for every Inception run here: 8 samples in 4 shards of 2, batches of 2.
PROTOCOL = dict(num_samples=8, sampler="ddim", sample_steps=2, batch_size=2, shard_size=2, reference_samples=10,
                pr_reference_samples=10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, inception_weights):
    """Storage with a tiny DiT checkpoint whose state names a real MLflow run in the storage's SQLite store."""
    root = tmp_path_factory.mktemp("eval-storage")
    tracker = Tracker(default_tracking_uri(str(root)), retry_timeout_s=10)
    run_id = tracker.open_run(experiment="dcdit", run_name="tiny")
    ckpt = tiny_checkpoint(root, arch="dit", run_name="tiny", mlflow_run_id=run_id)
    return {"root": root, "ckpt": str(ckpt), "run_id": run_id, "weights": inception_weights, "tracker": tracker}


def config(setup, **changes) -> EvalConfig:
    return EvalConfig(checkpoint=setup["ckpt"], weights=setup["weights"], metrics=("fid", "is", "kid", "pr"),
                      track=False, **{**PROTOCOL, **changes})


@pytest.fixture(scope="module")
def baseline(ray_cluster, setup, tmp_path_factory):
    """`dcdit eval --json` with one actor, exporting the samples and logging to the checkpoint's MLflow run."""
    export = tmp_path_factory.mktemp("export") / "samples.npz"
    argv = ["eval", setup["ckpt"], "--num-samples", "8", "--workers", "1", "--sampler", "ddim", "--sample-steps",
            "2", "--weights", setup["weights"], "--batch-size", "2", "--shard-size", "2", "--reference-samples",
            "10", "--pr-reference-samples", "10", "--export-npz", str(export), "--json"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    return {"summary": json.loads(out.getvalue().strip().splitlines()[-1]), "stderr": err.getvalue(),
            "export": export}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_eval_json_export_storage_and_mlflow(baseline, setup):
    s = baseline["summary"]
    for key in ("fid", "sfid", "is_mean", "is_std", "kid_mean", "precision", "recall", "gflops_per_image",
                "gmacs_per_forward"):
        assert isinstance(s[key], float) and math.isfinite(s[key]), key
    # Counted on the sampling calls (attention included) = the analytic MACs of one forward x 2 x 2 DDIM steps.
    analytic = forward_macs(open_checkpoint(setup["ckpt"]).config.model).gmacs
    assert math.isclose(s["gmacs_per_forward"], analytic, rel_tol=1e-6)
    assert math.isclose(s["gflops_per_image"], 2 * analytic * 2, rel_tol=1e-6)
    assert (s["num_samples"], s["sampler"], s["steps"], s["cfg_scale"], s["rho"]) == (8, "ddim", 2, 1.0, None)
    assert s["extractor"] == "inception-v3-compat" and s["weights_sha256"] == file_sha256(setup["weights"])
    assert s["reference_id"].startswith("synthetic:") and s["num_classes"] == 4 and s["step"] == 10
    assert s["workers"] == 1 and s["actor_failures"] == 0 and not s["reference_cached"]
    # 8 samples in 2048 dimensions: allowed, with a warning, and a finite real FID.
    assert any("biased" in w for w in s["warnings"]) and "warning:" in baseline["stderr"]

    with np.load(baseline["export"]) as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (8, 8, 8, 3)
        assert np.array_equal(npz["arr_1"], np.arange(8) % 4)
    stored = json.loads(open(s["result_uri"]).read())
    assert stored["fid"] == s["fid"] and os.path.exists(s["result_uri"][:-5] + ".png")

    run = setup["tracker"].client.get_run(setup["run_id"])
    # The run's first evaluation: its protocol is the run's default, whose metrics have stable keys.
    assert run.data.tags["dcdit.eval_protocol"] == s["slug"] and s["mlflow_prefix"] == "eval"
    assert run.data.metrics["eval/fid"] == pytest.approx(s["fid"], rel=1e-12)
    assert run.data.params["eval/num_samples"] == "8" and run.data.params["eval/sampler"] == "ddim"
    assert run.info.status == "RUNNING"  # the evaluator never changes the run's status
    # Progress as shards of 2 of the 8 samples come back: a line per quarter on the terminal, and in MLflow.
    progress = [line for line in baseline["stderr"].splitlines() if "samples generated" in line]
    assert [line.split(": ", 2)[-1].split(" (")[0] for line in progress] == ["2/8", "4/8", "6/8", "8/8"]
    assert all("ETA" in line for line in progress[:3]) and "(100%) in" in progress[3]
    history = setup["tracker"].metric_history(setup["run_id"], "eval_progress/samples")
    assert sorted(m.step for m in history) == [2, 4, 6, 8]
    prefix = f"eval/{s['slug']}"
    artifacts = {a.path for a in setup["tracker"].client.list_artifacts(setup["run_id"], prefix)}
    assert {f"{prefix}/samples.png", f"{prefix}/result.json"} <= artifacts


def test_two_workers_give_the_same_numbers(baseline, setup):
    s = evaluate(config(setup, workers=2))
    b = baseline["summary"]
    assert s["workers"] == 2 and s["reference_cached"]
    assert rel(s["fid"], b["fid"]) <= 1e-9
    for key in ("is_mean", "kid_mean", "precision", "recall", "gflops_per_image"):
        assert s[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def kill_a_busy_actor(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray Data actor process of this test's cluster (our descendants) seen computing a task (Ray
    titles it '...).submit' meanwhile): it then holds a shard for certain."""
    while not stop.is_set() and not killed:
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if " ".join(process.cmdline()).startswith("ray::MapWorker(MapBatches(_Runner)).submit"):
                    process.kill()
                    killed.append(process.pid)
                    return
        stop.wait(0.01)


def test_a_killed_actor_is_restarted_and_its_shards_recomputed_identically(baseline, setup):
    events: list[dict] = []
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_a_busy_actor, args=(stop, killed))
    killer.start()
    try:
        s = evaluate(config(setup, workers=2), on_event=events.append)
    finally:
        stop.set()
        killer.join()
    assert killed and s["actor_failures"] == 1
    assert any(e["restarted"] for e in events) and all(e["pid"] != killed[0] for e in events)
    assert rel(s["fid"], baseline["summary"]["fid"]) <= 1e-9
    assert s["kid_mean"] == pytest.approx(baseline["summary"]["kid_mean"], rel=1e-9)


def test_missing_weights_is_a_clear_error_before_any_work(setup, tmp_path, capsys):
    assert main(["eval", setup["ckpt"], "--weights", str(tmp_path / "nowhere.pth"), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcdit eval: error:") and INCEPTION_WEIGHTS_FILE in err and "--weights PATH" in err
    with pytest.raises(DCDiTError, match="tail-drop"):
        evaluate(config(setup, tail_drop=0.5))  # a DiT does not route


def test_reference_cache_keys_change_with_data_and_weights(tmp_path):
    folder = write_png_folder(tmp_path / "ref", render(np.arange(4), image_size=8).images)
    spec = ExtractorSpec("inception-v3-compat", "w.pth", "aa" * 32, identity={"weights_sha256": "aa" * 32})
    selection = {"count": 4, "pr_count": 4}
    before = dataset_source(str(folder), crop=8)
    key = reference_key(before.identity, spec, selection)
    assert key == reference_key(dataset_source(str(folder), crop=8).identity, spec, selection)
    other_weights = ExtractorSpec("inception-v3-compat", "w.pth", "bb" * 32, identity={"weights_sha256": "bb" * 32})
    assert reference_key(before.identity, other_weights, selection) != key
    assert reference_key(dataset_source(str(folder), crop=16).identity, spec, selection) != key  # resize setting
    write_png_folder(folder, render(np.arange(10, 11), image_size=8).images)  # rewrite 000000.png in place
    assert reference_key(dataset_source(str(folder), crop=8).identity, spec, selection) != key


def test_stale_cache_is_never_used_and_domain_fd(ray_cluster, setup, tmp_path):
    """After a reference image changes, its statistics get a new key and are recomputed, never read from the cache
    (reuse of an unchanged reference is checked by test_two_workers_give_the_same_numbers)."""
    folder = write_png_folder(tmp_path / "ref", render(np.arange(12), seed=0, image_size=8, num_classes=4).images)
    cfg = EvalConfig(checkpoint=setup["ckpt"], extractor=DOMAIN_EXTRACTOR, reference=str(folder), workers=2,
                     track=False, storage=str(setup["root"]), **{**PROTOCOL, "reference_samples": 12,
                                                                 "pr_reference_samples": 12})
    first = evaluate(cfg)
    assert "fd" in first and "fid" not in first and 0.0 <= first["class_accuracy"] <= 1.0
    assert first["reference_id"].startswith("folder:") and not first["reference_cached"]
    write_png_folder(folder, render(np.arange(100, 112), seed=5, image_size=8, num_classes=4).images)
    changed = evaluate(cfg)
    assert not changed["reference_cached"] and changed["reference_id"] != first["reference_id"]
    assert changed["fd"] != first["fd"]
    cache = open_storage(str(setup["root"])).listdir("_cache/fid-references")
    assert f"{changed['reference_id'].split(':')[1]}" in " ".join(cache)  # both versions are kept, by key
    assert f"{first['reference_id'].split(':')[1]}" in " ".join(cache)


def test_domain_extractor_lite_cfg_tail_drop_sweep_on_dcdit_against_an_adm_style_npz(ray_cluster, setup, tmp_path):
    # An ADM-style reference batch: mu/sigma of the "training set" (no counts) plus arr_0 images for PR/KID.
    classifier = domain_classifier_path(open_storage(str(setup["root"])), {
        "kind": "synthetic", "seed": 0, "image_size": 8, "num_classes": 4, "num_samples": 64})
    train = build_extractor(DOMAIN_EXTRACTOR, classifier)(render(np.arange(200), image_size=8, num_classes=4).images)
    stats = FeatureStats.from_features(train["pool"])
    npz = tmp_path / "VIRTUAL_synthetic8_labeled.npz"
    np.savez(npz, mu=stats.mean(), sigma=stats.covariance(),
             arr_0=render(np.arange(500, 512), image_size=8, num_classes=4).images)

    ckpt = tiny_checkpoint(tmp_path, arch="dcdit", run_name="tiny-dc", image_size=8, num_classes=4)
    s = evaluate(EvalConfig(checkpoint=str(ckpt), extractor=DOMAIN_EXTRACTOR, tail_drop_sweep=(0.0, 0.5),
                            lite_cfg=True, workers=2, storage=str(setup["root"]), reference=str(npz), **PROTOCOL))
    assert s["mlflow_logged"] is False  # the checkpoint names no MLflow run
    assert s["reference_id"].startswith("npz:")
    assert s["rho"] == [0.0, 0.5] and s["cfg_scale"] == 1.25 and s["lite_cfg"]
    first, second = s["sweep"]
    for entry in (first, second):
        assert {"fd", "class_accuracy", "kd_mean", "precision", "recall", "gflops_per_image"} <= set(entry)
        assert "fid" not in entry and math.isfinite(entry["fd"])
    assert second["gflops_per_image"] < first["gflops_per_image"]  # tail dropping skips backbone tokens
    assert os.path.exists(s["curve_uri"])
    assert np.array_equal(sample_labels(np.arange(6), 4), [0, 1, 2, 3, 0, 1])
