"""The sweep report against a real `mlflow server`: a parent run with children logged as training and evaluation
log them (one of them really trained in process, so its checkpoint feeds the detail probe). The report's CSV and
Markdown are checked against values read back from MLflow with MLflow's own client; runs evaluated under different
protocols must land in different, separately ranked tables with a visible warning.
"""

from __future__ import annotations

import csv
import json
import math
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from dcdit_platform.cli import main
from dcdit_platform.config import build_config
from dcdit_platform.evaluation import protocol_slug
from dcdit_platform.reports import build_report
from dcdit_platform.tracking import Tracker
from dcdit_platform.training import plan_run, run_local
from helpers.reports import PROTOCOL_A, PROTOCOL_B, evaluation_metrics, log_evaluation, log_training
from helpers.training import tiny_config

pytestmark = pytest.mark.slow


def _dit(**sections):
    model = {"arch": "dit", "depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 3,
             "num_classes": 4, "patch_size": 2}
    config = tiny_config(**sections)
    config["model"] = model
    config["train"].pop("chunking", None)
    return config


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):
    """A sweep of four runs: a really trained DC-DiT (N=4), a DiT baseline and a DC-DiT N=2 under protocol A (the
    N=2 one also under protocol B, plus a tail-drop sweep under A), and a DC-DiT N=8 under protocol B only."""
    root = tmp_path_factory.mktemp("report")
    storage = root / "runs"
    tracker = Tracker(mlflow_server.uri)
    experiment = f"report-{uuid.uuid4().hex[:8]}"
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    parent = tracker.open_run(experiment=experiment, run_name=name, tags={"dcdit.sweep": name, "dcdit.kind": "sweep"})
    tracking = {"uri": mlflow_server.uri, "experiment": experiment, "parent_run_id": parent}
    rng = np.random.default_rng(0)
    slug_a, slug_b = protocol_slug(PROTOCOL_A, [None]), protocol_slug(PROTOCOL_B, [None])
    slug_rho = protocol_slug(PROTOCOL_A, [0.0, 0.4])

    real = tiny_config(name="DC-DiT-tiny_N4_lam0.03", storage={"uri": str(storage)}, tracking=tracking,
                       resources={"num_workers": 1}, train={"steps": 12, "global_batch": 8, "lr": 2e-3,
                                                            "ema_decay": 0.9, "chunking": {"ratio_group_size": 4,
                                                                                           "ratio_loss_weight": 0.03}})
    real_id = run_local(plan_run(build_config(real)))["mlflow_run_id"]
    log_evaluation(tracker, real_id, slug_a, PROTOCOL_A, evaluation_metrics(rng, gflops=3.0), step=12)

    runs = {"DC-DiT-tiny_N4_lam0.03": real_id}
    specs = [("DiT-tiny_2", _dit(tracking=tracking), False, [(slug_a, PROTOCOL_A, 4.0)]),
             ("DC-DiT-tiny_N2_lam0.1", tiny_config(tracking=tracking, model={"downsample_factor": 2},
                                                   train={"steps": 12, "chunking": {"ratio_loss_weight": 0.1}}),
              True, [(slug_a, PROTOCOL_A, 5.0), (slug_b, PROTOCOL_B, 5.0)]),
             ("DC-DiT-tiny_N8_lam0.03", tiny_config(tracking=tracking, model={"downsample_factor": 8}), True,
              [(slug_b, PROTOCOL_B, 1.5)])]
    for run_name, config, dcdit, evaluations in specs:
        run_id = tracker.open_run(experiment=experiment, run_name=run_name, parent_run_id=parent)
        log_training(tracker, run_id, config, steps=12, dcdit=dcdit, seed=len(runs))
        for slug, protocol, gflops in evaluations:
            log_evaluation(tracker, run_id, slug, protocol, evaluation_metrics(rng, gflops=gflops), step=12)
        runs[run_name] = run_id
    # An elastic-inference sweep of the N=2 run under protocol A: another slug, the same protocol.
    n2 = runs["DC-DiT-tiny_N2_lam0.1"]
    tracker.log_params(n2, {f"eval/{slug_rho}/{k}": v for k, v in PROTOCOL_A.items() if k != "rho"})
    tracker.log_params(n2, {f"eval/{slug_rho}/rho": [0.0, 0.4]})
    for rho, gflops in ((0.0, 5.0), (0.4, 3.2)):
        tracker.log_metrics(n2, {f"eval/{slug_rho}/rho{rho:g}/{k}": v
                                 for k, v in evaluation_metrics(rng, gflops=gflops).items()}, 12)
    tracker.finish(parent)

    out = root / "report"
    summary = build_report(name, tracking_uri=mlflow_server.uri, storage=str(storage), out_dir=out, probe_images=16,
                           echo=lambda text: None)
    with open(out / "runs.csv", newline="") as f:
        records = list(csv.DictReader(f))
    return {"name": name, "parent": parent, "runs": runs, "summary": summary, "out": out, "records": records,
            "client": MlflowClient(tracking_uri=mlflow_server.uri), "storage": storage, "uri": mlflow_server.uri,
            "slugs": {"a": slug_a, "b": slug_b, "rho": slug_rho}, "experiment": experiment, "tracker": tracker}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def test_csv_agrees_with_mlflow(sweep):
    client, records = sweep["client"], sweep["records"]
    assert {r["name"] for r in records} == set(sweep["runs"])
    checked = 0
    for record in records:
        run = client.get_run(record["run_id"])
        metrics, params = run.data.metrics, run.data.params
        assert record["name"] == run.data.tags["dcdit.run_name"]
        assert record["arch"] == params["model.arch"]
        if record["arch"] == "dcdit":
            assert float(record["N"]) == float(params["model.downsample_factor"])
            assert float(record["lambda"]) == float(params["train.chunking.ratio_loss_weight"])
            assert _close(float(record["compression"]), metrics["router/compression_effective"])
        else:
            assert record["N"] == "" and record["compression"] == ""
        history = client.get_metric_history(record["run_id"], "train/loss")
        assert int(record["steps"]) == max(m.step for m in history)
        assert _close(float(record["images_per_s"]), metrics["perf/images_per_s"])
        if not record["eval_slug"]:
            continue
        prefix = f"eval/{record['eval_slug']}" + (f"/rho{float(record['rho']):g}" if record["rho"] else "")
        for column, metric in (("fd", "fd"), ("kd_mean", "kd_mean"), ("precision", "precision"),
                               ("recall", "recall"), ("class_accuracy", "class_accuracy"),
                               ("gflops_per_image", "gflops_per_image")):
            assert _close(float(record[column]), metrics[f"{prefix}/{metric}"]), (record["name"], column)
        protocol = {k: params[f"eval/{record['eval_slug']}/{k}"] for k in ("num_samples", "sampler", "steps")}
        assert float(record["protocol.num_samples"]) == float(protocol["num_samples"])
        assert record["protocol.sampler"] == protocol["sampler"]
        assert float(record["protocol.steps"]) == float(protocol["steps"])
        assert record["distance"] == "fd" and record["fid"] == ""  # the domain extractor gives FD, never FID
        checked += 1
    # real A, DiT A, N2 A + B + two tail-drop entries, N8 B
    assert checked == 7


def test_markdown_tables_agree_with_mlflow(sweep):
    client, records = sweep["client"], sweep["records"]
    text = (sweep["out"] / "report.md").read_text()
    tables = _markdown_tables(text)
    runs_table = tables["Runs"]
    for name, run_id in sweep["runs"].items():
        row = runs_table[name]
        metrics = client.get_run(run_id).data.metrics
        if "router/compression_effective" in metrics:
            assert row["compression"] == f"{metrics['router/compression_effective']:.3g}"
        assert row["images/s"] == f"{metrics['perf/images_per_s']:.3g}"
    for record in records:
        if not record["eval_slug"]:
            continue
        table = tables[record["protocol_id"]]
        key = record["name"] + (f" rho={float(record['rho']):g}" if record["rho"] else "")
        row = table[key]
        prefix = f"eval/{record['eval_slug']}" + (f"/rho{float(record['rho']):g}" if record["rho"] else "")
        value = client.get_run(record["run_id"]).data.metrics[f"{prefix}/fd"]
        assert row["FD"] == f"{value:.5g}"
        assert row["rank"] == record["rank_in_protocol"]


def _markdown_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """Tables under '## Runs' and '### P...' headings: heading key -> row key (run, with rho) -> column -> cell."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    heading = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## ") or line.startswith("### "):
            heading = line.lstrip("#").strip().split(":")[0]
        if line.startswith("| ") and heading and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split(" | ")]
            rows = {}
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                cells = [c.strip() for c in lines[i].strip().strip("|").split(" | ")]
                row = dict(zip(header, cells))
                i += 1
                if "run" not in row:
                    continue  # the probe tables (one row per timestep)
                key = row["run"] + (f" rho={row['rho']}" if row.get("rho") not in (None, "-") else "")
                rows[key] = row
            out.setdefault(heading, rows)
            continue
        i += 1
    return out


def test_mixing_protocols_is_flagged_and_never_ranked_together(sweep):
    records = [r for r in sweep["records"] if r["eval_slug"]]
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["protocol_id"], []).append(record)
    assert len(groups) == 2
    by_samples = {g[0]["protocol.num_samples"]: g for g in groups.values()}
    group_a, group_b = by_samples["256"], by_samples["64"]
    # The tail-drop sweep (another slug) shares protocol A and is ranked with it; nothing of B is in A.
    assert {r["name"] for r in group_a} == {"DC-DiT-tiny_N4_lam0.03", "DiT-tiny_2", "DC-DiT-tiny_N2_lam0.1"}
    assert {r["name"] for r in group_b} == {"DC-DiT-tiny_N2_lam0.1", "DC-DiT-tiny_N8_lam0.03"}
    assert "DC-DiT-tiny_N8_lam0.03" not in {r["name"] for r in group_a}
    for group in (group_a, group_b):
        ranks = sorted(int(r["rank_in_protocol"]) for r in group)
        assert ranks == list(range(1, len(group) + 1))  # each table ranks its own entries from 1
        order = sorted(group, key=lambda r: int(r["rank_in_protocol"]))
        assert [float(r["fd"]) for r in order] == sorted(float(r["fd"]) for r in group)
    text = (sweep["out"] / "report.md").read_text()
    assert "WARNING: 2 different evaluation protocols" in text and "samples, sampler, steps" in text
    html = (sweep["out"] / "report.html").read_text()
    assert 'id="protocol-warning"' in html
    assert sweep["summary"]["mixed_protocols"] is True
    tables = _markdown_tables(text)
    assert set(tables[group_a[0]["protocol_id"]]) >= {"DiT-tiny_2", "DC-DiT-tiny_N4_lam0.03"}
    assert "DC-DiT-tiny_N8_lam0.03" not in tables[group_a[0]["protocol_id"]]


def test_one_protocol_is_not_flagged(sweep, tmp_path):
    tracker, rng = sweep["tracker"], np.random.default_rng(1)
    name = f"single-{uuid.uuid4().hex[:8]}"
    parent = tracker.open_run(experiment=sweep["experiment"], run_name=name)
    for run_name, gflops in (("DiT-a", 1.0), ("DiT-b", 2.0)):
        run_id = tracker.open_run(experiment=sweep["experiment"], run_name=run_name, parent_run_id=parent)
        log_training(tracker, run_id, _dit(), steps=4, dcdit=False, seed=3)
        log_evaluation(tracker, run_id, sweep["slugs"]["a"], PROTOCOL_A, evaluation_metrics(rng, gflops=gflops), 4)
    summary = build_report(name, tracking_uri=sweep["uri"], out_dir=tmp_path / "r", attach=False,
                           echo=lambda text: None)
    assert summary["mixed_protocols"] is False and len(summary["protocols"]) == 1
    assert "WARNING" not in (tmp_path / "r" / "report.md").read_text()


def test_detail_probe_of_the_trained_run_is_reported_and_logged(sweep):
    summary, client = sweep["summary"], sweep["client"]
    real = next(r for r in summary["runs"] if r["name"] == "DC-DiT-tiny_N4_lam0.03")
    # The headline AUC lies inside its own bootstrap interval, a proper one (AUCs are in [0, 1]; the AUC itself is
    # checked against a hand computation in tests/dcdit/test_probe.py).
    low, high = real["detail_auc_interval"]
    assert 0.0 <= low <= real["detail_auc"] <= high <= 1.0 and low < high
    ts = list(real["kept_fraction_by_t"])
    assert ts == sorted(ts, reverse=True) and len(ts) == 5  # noisy -> clean
    logged = client.get_run(sweep["runs"]["DC-DiT-tiny_N4_lam0.03"]).data.metrics
    assert math.isclose(logged["report/detail_auc"], real["detail_auc"], rel_tol=1e-12)
    record = next(r for r in sweep["records"] if r["name"] == "DC-DiT-tiny_N4_lam0.03")
    assert math.isclose(float(record["detail_auc"]), logged["report/detail_auc"], rel_tol=1e-12)
    text = (sweep["out"] / "report.md").read_text()
    assert "![boundary maps DC-DiT-tiny_N4_lam0.03](figures/boundaries_DC-DiT-tiny_N4_lam0.03.png)" in text
    assert (sweep["out"] / "figures" / "boundaries_DC-DiT-tiny_N4_lam0.03.png").stat().st_size > 1000
    # Runs without a checkpoint say so instead of inventing a number.
    assert "DC-DiT-tiny_N8_lam0.03: not probed (no readable checkpoint: none in" in text
    findings = summary["findings"]
    assert any("Boundaries follow the ground-truth detail masks in" in line for line in findings["detail"])
    assert any(line.startswith("DC-DiT-tiny_N4_lam0.03: kept fraction") for line in findings["timestep"])


def test_figures_and_report_are_attached_to_the_parent(sweep):
    client, parent = sweep["client"], sweep["parent"]
    names = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"report.html", "report.md", "runs.csv", "report.json", "figures"} <= names
    figures = {Path(a.path).name for a in client.list_artifacts(parent, "report/figures")}
    assert "timestep.png" in figures and "loss.png" in figures
    assert sum(name.startswith("pareto_P") for name in figures) == 2  # one Pareto plot per protocol
    html = (sweep["out"] / "report.html").read_text()
    # Self-contained: no scripts, every picture embedded, nothing fetched from anywhere.
    assert "<script" not in html and 'src="data:image/png;base64,' in html
    assert not re.search(r'(src|href)="(?!data:)', html)


def test_cli_json_and_one_line_errors(sweep, tmp_path, capsys):
    rc = main(["report", sweep["parent"], "--tracking-uri", sweep["uri"], "--out", str(tmp_path / "cli"),
               "--no-attach", "--no-probe", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["name"] == sweep["name"] and summary["mlflow_run_id"] == sweep["parent"]
    assert Path(summary["report_html"]).is_file() and Path(summary["report_csv"]).is_file()
    assert {r["name"] for r in summary["runs"]} == set(sweep["runs"])
    assert all("fd" in r and "gflops" in r for r in summary["runs"])
    rc = main(["report", "no-such-sweep", "--tracking-uri", sweep["uri"], "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no MLflow run named 'no-such-sweep'" in err[0]


def test_report_renders_in_headless_chromium(sweep, browser, tmp_path):
    page = sweep["out"] / "report.html"
    rendered = browser.render(page, tmp_path / "report.png")
    assert rendered.errors == []
    expected = page.read_text().count("<img ")
    assert expected >= 5 and len(rendered.images) == expected  # 2 Pareto plots, timestep, loss, boundary maps
    assert all(image["complete"] and image["width"] > 0 and image["height"] > 0 for image in rendered.images)
    assert not rendered.blank()
    assert "Do boundaries follow detail?" in rendered.text and "WARNING: 2 different evaluation protocols" in rendered.text


def test_the_browser_check_catches_broken_pages(browser, tmp_path):
    """The checks above can fail: a missing image, a console error and an empty page are all seen."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><p>x</p><img alt="gone" src="missing.png">'
                      '<script>console.error("boom")</script></body></html>')
    rendered = browser.render(broken, tmp_path / "broken.png")
    assert any("boom" in e for e in rendered.errors)
    assert rendered.images == [{"alt": "gone", "complete": True, "width": 0, "height": 0}]
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    assert browser.render(empty, tmp_path / "empty.png").blank()
