"""`dcdit quickstart` end to end at a reduced size, as a user runs it (a subprocess: its own embedded Ray and MLflow
store), checked against the MLflow store read back with MLflow's own client and rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dcdit_platform.cli import main
from helpers.browser import Chromium, chromium_binary
pytestmark = pytest.mark.slow

# The packaged sweep (N in {2, 4} x lambda in {0.03, 0.3} and two DiT baselines) at a reduced size: one lambda.
TRIALS = {"DC-DiT-tiny_N2_lam0.3", "DC-DiT-tiny_N4_lam0.3", "DiT-tiny_2", "DiT-tiny_4"}


REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dcdit_platform.cli", "quickstart", *args], capture_output=True,
                          text=True, env=env, timeout=1500)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The packaged quickstart sweep with one lambda, 6 steps per run, 16 samples per evaluation and a smaller
    reference set, on a machine that has Inception weights in its torch hub cache (seeded random ones: the real
    file cannot be downloaded here), so every run gets FD (domain classifier) and FID."""
    from dcdit.features import INCEPTION_WEIGHTS_FILE
    from helpers.evaluation import random_inception_weights

    root = tmp_path_factory.mktemp("quickstart")
    hub = root / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_WEIGHTS_FILE).write_bytes(Path(random_inception_weights(str(root))).read_bytes())
    config = root / "sweep.yaml"
    config.write_text(f"_base_: {REPO / 'experiments/quickstart/sweep.yaml'}\n"
                      f"experiment: {REPO / 'experiments/quickstart/experiment.yaml'}\n"
                      "grid: {model.downsample_factor: [2, 4], train.chunking.ratio_loss_weight: [0.3]}\n"
                      "evaluation: {reference_samples: 128, pr_reference_samples: 64}\n")
    out = root / "qs"
    args = ["--out", str(out), "--config", str(config), "--steps", "6", "--eval-samples", "16"]
    done = _run([*args, "--fid", "--json"], env={"TORCH_HOME": str(root / "torch")})
    assert done.returncode == 0, done.stderr[-4000:]
    return {"out": out, "args": args, "summary": json.loads(done.stdout.strip().splitlines()[-1]), "root": root}


@pytest.mark.timeout(1800)
def test_quickstart_json_and_mlflow_agree(quickstart):
    out, summary = quickstart["out"], quickstart["summary"]
    assert {"report_html", "mlflow_run_id", "tracking_uri", "runs"} <= summary.keys()
    assert summary["tracking_uri"] == f"sqlite:///{out.resolve().as_posix()}/mlflow.db"
    assert Path(summary["report_html"]).is_file() and Path(summary["report_html"]).parent.parent == out.resolve()
    assert summary["mlflow_ui"] == f"mlflow ui --backend-store-uri {summary['tracking_uri']}"
    runs = {r["name"]: r for r in summary["runs"]}
    assert set(runs) == TRIALS
    for name, run in runs.items():
        assert {"name", "arch", "N", "lambda", "gflops", "fd", "fid"} <= run.keys()
        assert run["gflops"] > 0 and math.isfinite(run["fd"]) and math.isfinite(run["fid"])
        assert run["fd"] != run["fid"]  # two feature spaces, two numbers
        if name.startswith("DiT"):
            assert run["arch"] == "dit" and run["N"] is None and run["lambda"] is None
        else:
            assert run["arch"] == "dcdit" and (run["N"], run["lambda"]) in {(2, 0.3), (4, 0.3)}
    # DC-DiT at N=4 keeps fewer backbone tokens than at N=2, and DiT with patch 4 costs less than with patch 2.
    assert runs["DC-DiT-tiny_N4_lam0.3"]["gflops"] < runs["DC-DiT-tiny_N2_lam0.3"]["gflops"]
    assert runs["DiT-tiny_4"]["gflops"] < runs["DiT-tiny_2"]["gflops"]

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags["dcdit.run_name"] for c in children} == TRIALS
    for child in children:
        run = runs[child.data.tags["dcdit.run_name"]]
        assert child.info.status == "FINISHED"
        for key in ("fd", "fid"):  # one evaluation per feature space, as the summary says
            values = [v for k, v in child.data.metrics.items() if k.startswith("eval/") and k.endswith(f"/{key}")]
            assert len(values) == 1 and math.isclose(values[0], run[key], rel_tol=1e-12), (key, values)
        gflops = next(v for k, v in child.data.metrics.items() if k.endswith("/gflops_per_image"))
        assert math.isclose(gflops, run["gflops"], rel_tol=1e-12)
        if run["arch"] == "dcdit":  # the headline AUC is the mean of the per-timestep AUCs the probe logged
            per_t = [v for k, v in child.data.metrics.items() if k.startswith("report/detail_auc_t")]
            assert len(per_t) >= 2 and math.isclose(sum(per_t) / len(per_t), run["detail_auc"], rel_tol=1e-9)
    # The sweep's evaluation protocol ran on every finished trial (outside its placement group), logged into the
    # trial's run, and its numbers reached the sweep's trial records.
    for child in children:
        name = child.data.tags["dcdit.run_name"]
        record = json.loads((out / "runs" / "quickstart" / "_trials" / f"{name}.json").read_text())
        evaluation = record["evaluation"]
        assert record["status"] == "FINISHED" and evaluation["num_samples"] == 16 and evaluation["step"] == 6
        assert record["metrics"]["eval/fd"] == runs[name]["fd"]
        # The sweep's protocol is each run's default: its FD has the stable key, one column for every run.
        assert child.data.tags["dcdit.eval_protocol"] == evaluation["slug"]
        assert child.data.metrics["eval/fd"] == record["metrics"]["eval/fd"]
        assert {k for k in record["metrics"] if k.startswith("eval/")} <= {
            "eval/fd", "eval/kd_mean", "eval/kd_std", "eval/precision", "eval/recall", "eval/class_accuracy"}
        assert Path(evaluation["result_uri"]).is_file()
    artifacts = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.html", "report.md", "runs.csv", "figures"} <= artifacts
    # The science is stated, not only plotted, with the strength it has: 6 steps at ema_decay 0.98 leave
    # 0.98 ** 6 = 89% of the initialisation in the EMA weights, and 16 samples are fewer than the 128 (domain) and
    # 2048 (Inception) feature dimensions.
    findings = summary["findings"]
    assert findings["detail"][0].startswith("No DC-DiT run trained long enough to tell whether boundaries follow "
                                            "detail: after 6 steps its EMA weights are still 89% the initialisation")
    assert sum("kept fraction" in line and "too short to compare" in line for line in findings["timestep"]) == 2
    assert sum("these numbers do not rank the runs: from 16 samples in" in line for line in findings["quality"]) == 2
    # FD (domain classifier) and FID (Inception) are two protocols: never ranked together.
    text = Path(summary["report_md"]).read_text()
    assert "WARNING: 2 different evaluation protocols" in text and "extractor" in text


def test_quickstart_report_renders_in_headless_chromium(quickstart, tmp_path):
    binary = chromium_binary()
    assert binary, "Chromium is not installed: `apt-get install chromium` (.ci/run does)"
    summary = quickstart["summary"]
    browser = Chromium(binary, tmp_path)
    try:
        rendered = browser.render(Path(summary["report_html"]), tmp_path / "quickstart.png")
    finally:
        browser.close()
    assert rendered.errors == []
    assert len(rendered.images) >= 3 + 2  # Pareto, timestep, loss, 2 boundary maps (+ sample grids)
    assert all(image["complete"] and image["width"] > 0 for image in rendered.images)
    assert not rendered.blank()


def test_other_settings_in_the_same_folder_are_refused_in_one_line(quickstart, capsys):
    rc = main(["quickstart", *quickstart["args"][:-4], "--steps", "7", "--eval-samples", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "holds a quickstart run with other settings" in err[0]
