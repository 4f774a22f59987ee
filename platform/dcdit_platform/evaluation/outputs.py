"""Where an evaluation's results go: the images kept while sampling (the sample grid, the --export-npz batch), the
result JSON, sample grids and elastic-inference curve next to the run in storage, and the checkpoint's MLflow run
(metrics at the checkpoint's step: stable keys eval/fd, eval/fid, ... for the run's default protocol, eval/<slug>/...
for others; the protocol as params and as a dataset input; figures as images and artifacts under eval/<slug>/).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dcdit.errors import DCDiTError
from dcdit.features import INCEPTION
from dcdit.generate import sample_labels
from dcdit.viz import sample_grid
from dcdit_platform.evaluation.npz_files import NpzSampleWriter
from dcdit_platform.evaluation.protocol import PROTOCOL_PARAMS, EvalConfig
from dcdit_platform.runs import LoadedCheckpoint
from dcdit_platform.tracking import EVAL_PROTOCOL_TAG, TRACKING_ENV, Tracker, resolve_tracking_uri

RESULTS_DIR = "evaluations"  # {storage}/{run name}/evaluations/{checkpoint}/{slug}.json
GRID_IMAGES = 64  # samples shown in a result's sample grid


@dataclass
class PlanResult:
    """What one sampling plan (one tail-drop fraction) gave: its metrics and the first samples, for the grid."""

    metrics: dict
    grid: np.ndarray | None


class SampleKeeper:
    """Keeps the images of a generation run as its shards arrive in order: the first GRID_IMAGES for the grid and,
    with an export path, all of them streamed into an ADM sample batch. A failed run leaves no partial batch."""

    def __init__(self, export: str | None, num_samples: int, num_classes: int):
        self.export, self.num_samples, self.num_classes = export, num_samples, num_classes
        self.writer: NpzSampleWriter | None = None
        self.parts: list[np.ndarray] = []
        self.kept = 0

    def add(self, images: np.ndarray | None) -> None:
        if images is None:
            return
        if self.writer is None and self.export:
            self.writer = NpzSampleWriter(self.export, self.num_samples, images.shape[1:],
                                          sample_labels(np.arange(self.num_samples), self.num_classes))
        if self.writer is not None:
            self.writer.write(images)
        if self.kept < GRID_IMAGES:
            self.parts.append(images[:GRID_IMAGES - self.kept])
            self.kept += len(self.parts[-1])

    def grid(self) -> np.ndarray | None:
        return np.concatenate(self.parts) if self.parts else None

    def __enter__(self) -> SampleKeeper:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None and self.writer is not None:
            self.writer.abort()

    def close(self) -> str | None:
        """The exported batch's path (None without export)."""
        return self.writer.close() if self.writer is not None else None


def publish(cfg: EvalConfig, ckpt: LoadedCheckpoint, storage, slug: str, summary: dict, runs: list[PlanResult], *,
            echo: Callable[[str], None]) -> None:
    """The result into storage (summary["result_uri"]) and, when tracked, the checkpoint's MLflow run
    (summary["mlflow_logged"]); figures are drawn once for both."""
    sweep = "sweep" in summary
    with tempfile.TemporaryDirectory() as tmp:
        grids = {}  # file-name suffix -> PNG
        for i, run in enumerate(runs):
            if run.grid is not None:
                suffix = f"-rho{summary['sweep'][i]['rho']:g}" if sweep else ""
                grids[suffix] = sample_grid(run.grid, os.path.join(tmp, f"samples{suffix}.png"))
        curve = elastic_curve(summary, os.path.join(tmp, "elastic_curve.png")) if sweep else None
        summary["result_uri"] = write_result(storage, ckpt, slug, summary, grids, curve)
        if cfg.track:
            summary["mlflow_logged"] = log_to_mlflow(cfg, ckpt, slug, summary, [*grids.values(), curve], echo=echo)


def write_result(storage, ckpt: LoadedCheckpoint, slug: str, summary: dict, grids: dict[str, Path],
                 curve: Path | None) -> str:
    """The summary JSON, sample grid PNG(s) and, for a sweep, the elastic-inference curve, next to the run."""
    base = f"{ckpt.run_name or 'unnamed'}/{RESULTS_DIR}/{ckpt.dirname}/{slug}"
    for suffix, path in grids.items():
        storage.write_bytes(f"{base}{suffix}.png", path.read_bytes())
    summary["grid_uris"] = [storage.join(f"{base}{suffix}.png") for suffix in grids]
    if curve is not None:
        storage.write_bytes(f"{base}-curve.png", curve.read_bytes())
        summary["curve_uri"] = storage.join(f"{base}-curve.png")
    storage.write_json(f"{base}.json", summary)
    return storage.join(f"{base}.json")


def elastic_curve(summary: dict, path: str) -> Path:
    """FID (or FD) against GFLOPs per image, one point per tail-drop fraction."""
    name = "fid" if summary["extractor"] == INCEPTION else "fd"
    points = [(e["gflops_per_image"], e[name], e["rho"]) for e in summary["sweep"]]
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for x, y, rho in points:
        ax.annotate(f"rho={rho:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("GFLOPs per image (sampling)")
    ax.set_ylabel(f"{name.upper()} ({summary['num_samples']} samples)")
    ax.set_title("Elastic inference: tail-drop sweep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def log_to_mlflow(cfg: EvalConfig, ckpt: LoadedCheckpoint, slug: str, summary: dict, figures: list[Path | None], *,
                  echo: Callable[[str], None]) -> bool:
    """Metrics (at the checkpoint's step), protocol (as params and as the run's evaluation dataset) and figures into
    the checkpoint's MLflow run; False when the checkpoint records no run. The run's status is left alone (it may
    still be training). Metrics of the run's default protocol (`default_protocol`) have stable keys (eval/fd,
    eval/fid, ...: one column in MLflow's compare view for every run evaluated alike); other protocols keep theirs
    under eval/<slug>/. Figures and the result JSON go under eval/<slug>/ either way."""
    if not ckpt.mlflow_run_id:
        echo("warning: the checkpoint records no MLflow run (state.json mlflow_run_id); results are in storage only")
        return False
    tracker = Tracker(_tracking_uri(cfg, ckpt.config), retry_timeout_s=ckpt.config.tracking.retry_timeout_s)
    run_id = ckpt.mlflow_run_id
    run = tracker.get_run(run_id)  # a one-line error when the server does not know the run
    digest = slug.rsplit("-", 1)[-1]
    tracker.log_dataset(run_id, name=slug, digest=digest, source=str(summary["reference"]), context="evaluation")
    prefix = "eval" if default_protocol(tracker, run, slug, summary) else f"eval/{slug}"
    summary["mlflow_prefix"] = prefix
    tracker.log_params(run_id, {f"{prefix}/{k}": v for k, v in summary.items() if k in PROTOCOL_PARAMS})
    entries = summary["sweep"] if "sweep" in summary else [summary]
    for entry in entries:
        sub = f"{prefix}/rho{entry['rho']:g}" if "sweep" in summary else prefix
        numbers = {f"{sub}/{k}": v for k, v in entry.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in PROTOCOL_PARAMS
                   and k not in ("rho", "step", "workers", "actor_failures") and math.isfinite(float(v))}
        tracker.log_metrics(run_id, numbers, int(ckpt.step or 0), dataset=(slug, digest))
    for path in figures:
        if path is not None:
            tracker.log_artifact(run_id, path, f"eval/{slug}")
            tracker.log_image(run_id, path, f"eval/{slug}/{path.stem}", int(ckpt.step or 0))
    tracker.log_text(run_id, json.dumps(summary, indent=1, sort_keys=True, default=str), f"eval/{slug}/result.json")
    return True


def progress_logger(cfg: EvalConfig, ckpt: LoadedCheckpoint,
                    echo: Callable[[str], None]) -> Callable[[int, float], None] | None:
    """A callback logging the evaluation's progress into the checkpoint's MLflow run (eval_progress/samples and
    eval_progress/eta_s, at the count of samples done), or None when the evaluation is not tracked. An MLflow
    failure here costs only the progress metrics, never the evaluation."""
    if not (cfg.track and ckpt.mlflow_run_id):
        return None
    tracker = Tracker(_tracking_uri(cfg, ckpt.config), retry_timeout_s=5.0)
    failed = []

    def log(done: int, eta_s: float) -> None:
        if failed:
            return
        try:
            tracker.log_metrics(ckpt.mlflow_run_id, {"eval_progress/samples": done, "eval_progress/eta_s": eta_s},
                                done)
        except DCDiTError as err:
            failed.append(err)
            echo(f"warning: progress not logged to MLflow: {err}")

    return log


def default_protocol(tracker: Tracker, run, slug: str, summary: dict) -> bool:
    """Whether `slug` is the run's default protocol: the first evaluation of the whole model (no tail drop, not a
    sweep) claims it (tag EVAL_PROTOCOL_TAG, param eval/protocol), so later evaluations of other protocols cannot
    move the stable keys to different numbers."""
    if "sweep" in summary or summary.get("rho") is not None:
        return False
    claimed = run.data.tags.get(EVAL_PROTOCOL_TAG)
    if claimed is None:
        tracker.set_tags(run.info.run_id, {EVAL_PROTOCOL_TAG: slug})
        tracker.log_params(run.info.run_id, {"eval/protocol": slug})
        return True
    return claimed == slug


def _tracking_uri(cfg: EvalConfig, config) -> str:
    """--tracking-uri, else the run's own (recorded without credentials), else MLFLOW_TRACKING_URI, else the
    storage's default sqlite (`resolve_tracking_uri`)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if config.tracking.uri and "***" not in config.tracking.uri:
        return config.tracking.uri
    if config.storage.is_s3 and not os.environ.get(TRACKING_ENV):
        raise DCDiTError("the run's MLflow server is not recorded without credentials: pass --tracking-uri")
    return resolve_tracking_uri(None, config.storage.uri)


def format_table(summary: dict) -> str:
    """What `dcdit eval` prints without --json: the protocol in one line, one row of metrics per tail-drop fraction."""
    lines = [f"checkpoint {summary['checkpoint']} (step {summary['step']}): {summary['num_samples']} samples, "
             f"{summary['sampler']} {summary['steps']} steps, cfg {summary['cfg_scale']:g}"
             + (", Lite-CFG" if summary["lite_cfg"] else "") + f", reference {summary['reference']}"]
    entries = summary.get("sweep") or [summary]
    keys = [k for k in ("fid", "fd", "sfid", "is_mean", "kid_mean", "kd_mean", "precision", "recall",
                        "class_accuracy", "gflops_per_image") if any(k in e for e in entries)]
    lines.append("  " + "  ".join(f"{k:>14}" for k in ["rho", *keys]))
    for e in entries:
        cells = [e.get("rho") if "sweep" in summary else summary.get("rho")] + [e.get(k) for k in keys]
        lines.append("  " + "  ".join(f"{_cell(c):>14}" for c in cells))
    lines.append(f"  results: {summary['result_uri']}")
    lines += [f"  sample grid: {uri}" for uri in summary.get("grid_uris", ())]
    if summary.get("export_npz"):
        lines.append(f"  samples: {summary['export_npz']}")
    if summary.get("mlflow_logged"):
        lines.append(f"  MLflow run {summary['mlflow_run_id']} (metrics {summary['mlflow_prefix']}/..., figures under "
                     f"eval/{summary['slug']}/)")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.5g}" if isinstance(value, float) else str(value)
