"""The one-command quickstart: the quickstart sweep (experiments/quickstart/) on an embedded local Ray with a local
MLflow store under one output folder, every trial evaluated (FD with the synthetic domain classifier; FID too when
the Inception weights are on this machine), then the sweep report. No cluster, no GPU, no downloads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dcdit.errors import DCDiTError
from dcdit.features import INCEPTION, inception_cache_path
from dcdit_platform import console
from dcdit_platform.config import load_yaml_tree
from dcdit_platform.evaluation import EvalConfig, domain_classifier_path, evaluate, training_reference
from dcdit_platform.raycluster import ray_session
from dcdit_platform.reports import build_report
from dcdit_platform.sweeps import eval_protocol, load_sweep, run_sweep

SWEEP_FILE = "sweep.yaml"  # {out}/sweep.yaml: the sweep this quickstart ran (the packaged one plus the knobs)
DEFAULT_OUT = "dcdit-quickstart"  # --out
STORAGE_DIR = "runs"  # {out}/runs: the sweep's storage root (checkpoints, caches, records)


def default_config() -> Path:
    """experiments/quickstart/sweep.yaml of this checkout (the package is installed editable from it)."""
    return Path(__file__).resolve().parents[2] / "experiments" / "quickstart" / "sweep.yaml"


def write_sweep_file(out: Path, base: Path, *, steps: int | None, eval_samples: int | None) -> Path:
    """{out}/sweep.yaml: `_base_` the chosen sweep, with the experiment path made absolute and the size knobs."""
    if not base.is_file():
        raise DCDiTError(f"quickstart sweep {base} not found: pass --config experiments/quickstart/sweep.yaml from "
                         "a checkout of the repository")
    tree = load_yaml_tree(base)
    experiment = tree.get("experiment")
    if not isinstance(experiment, str):
        raise DCDiTError(f"{base} names no base experiment (experiment: FILE.yaml)")
    data: dict[str, Any] = {"_base_": str(base), "experiment": str((base.parent / experiment).resolve())}
    if steps is not None:
        if steps < 1:
            raise DCDiTError(f"--steps must be >= 1, got {steps}")
        every = max(1, min(steps, 100))
        data["overrides"] = {"train.steps": steps, "checkpoint.every": every,
                             "logging.every": max(1, min(10, steps // 4 or 1))}
    if eval_samples is not None:
        if eval_samples < 8:
            raise DCDiTError(f"--eval-samples must be >= 8, got {eval_samples}")
        batch = min(64, eval_samples)
        data["evaluation"] = {"num_samples": eval_samples, "batch_size": batch,
                              "shard_size": batch * -(-eval_samples // batch)}
    text = ("# Written by `dcdit quickstart`: the sweep it ran (re-running the same command reuses its results).\n"
            + yaml.safe_dump(data, sort_keys=False))
    path = out / SWEEP_FILE
    if path.is_file() and path.read_text() != text and (out / "runs").exists():
        raise DCDiTError(f"{out} holds a quickstart run with other settings ({path}); choose another --out or remove "
                         "that folder")
    path.write_text(text)
    return path


def prepare_domain_extractor(plan, echo: Callable[[str], None]) -> None:
    """Train the synthetic domain classifier (the FD feature extractor) once, into the sweep's cache, before the
    trials start: concurrent trial evaluations would otherwise each train it."""
    config = plan.trials[0].config
    source = training_reference(config)[1]
    if source is None:
        return
    storage = plan.sweep_storage
    storage.makedirs()
    started = time.perf_counter()
    domain_classifier_path(storage, source, echo=echo)
    echo(f"domain classifier ready ({time.perf_counter() - started:.0f} s)")


def inception_available() -> str | None:
    """The local Inception weights file, or None (the quickstart never downloads)."""
    path = inception_cache_path()
    return str(path) if path.is_file() else None


def evaluate_fid(plan, summary: dict, weights: str, echo: Callable[[str], None]) -> None:
    """FID of every finished trial with the sweep's protocol and the Inception features (logged to its run)."""
    protocol = dict(eval_protocol(plan.spec.evaluation or {}, plan.trials[0].config.resources))
    protocol.update(extractor=INCEPTION, weights=weights, workers=None)  # one actor per CPU
    with ray_session(log_to_driver=False):  # one local Ray for all evaluations (evaluate() reuses it)
        for trial in summary["trials"]:
            if trial.get("status") != "FINISHED" or not trial.get("checkpoint"):
                continue
            echo(f"FID of {trial['name']} (Inception weights {weights})")
            evaluate(EvalConfig(checkpoint=trial["checkpoint"], tracking_uri=plan.tracking_uri,
                                storage=plan.sweep_storage.uri, track=True, **protocol),
                     echo=lambda text: echo(f"  {text}"))


def run_quickstart(out: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
                   steps: int | None = None, eval_samples: int | None = None, fid: bool | None = None,
                   echo: Callable[[str], None] | None = None) -> dict:
    """Run the quickstart into `out` and return its summary (report paths, MLflow ids, one entry per run)."""
    echo = echo or console.echo("quickstart")
    started = time.perf_counter()
    out_dir = Path(out or DEFAULT_OUT).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = out_dir / STORAGE_DIR
    tracking_uri = f"sqlite:///{out_dir.as_posix()}/mlflow.db"
    sweep_file = write_sweep_file(out_dir, Path(config).expanduser().resolve() if config else default_config(),
                                  steps=steps, eval_samples=eval_samples)
    plan = load_sweep(sweep_file, storage=str(storage), tracking_uri=tracking_uri)
    for warning in plan.warnings:
        echo(f"warning: {warning}")
    echo(f"{len(plan.trials)} trials ({', '.join(t.name for t in plan.trials)}) into {out_dir}")
    prepare_domain_extractor(plan, echo)
    # resume=True: a first run starts the sweep; running the same command again reuses what is finished.
    summary = run_sweep(plan, resume=True, echo=lambda text: echo(text))
    failed = [t for t in summary["trials"] if t.get("status") != "FINISHED"]
    if failed:
        detail = "; ".join(f"{t['name']}: {t.get('status')}" + (f" ({t['error']})" if t.get("error") else "")
                           for t in failed)
        raise DCDiTError(f"the quickstart sweep did not finish ({detail}); run the same command again to resume it")
    weights = inception_available() if fid is not False else None
    if fid and weights is None:
        raise DCDiTError("--fid needs the Inception weights in the torch hub cache (see `dcdit eval --help`)")
    if weights:
        evaluate_fid(plan, summary, weights, echo)
    elif fid is None:
        echo("no Inception weights on this machine: FD with the synthetic domain classifier only (no FID)")
    report = build_report(plan.name, tracking_uri=tracking_uri, out_dir=out_dir / "report", echo=echo)
    runs = []
    for entry in report["runs"]:
        run = {k: entry.get(k) for k in ("name", "arch", "N", "lambda", "gflops", "params", "compression",
                                         "detail_auc", "run_id")}
        for key in ("fd", "fid"):
            if entry.get(key) is not None:
                run[key] = entry[key]
        runs.append(run)
    db = out_dir / "mlflow.db"
    return {"report_html": report["report_html"], "report_md": report["report_md"], "report_csv": report["report_csv"],
            "figures": str(Path(report["out_dir"]) / "figures"), "checkpoints": plan.sweep_storage.uri,
            "mlflow_run_id": summary["mlflow_run_id"], "tracking_uri": tracking_uri, "experiment": plan.experiment,
            "sweep": plan.name, "out": str(out_dir), "sweep_file": str(sweep_file),
            "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{db.as_posix()}",
            "runs": runs, "findings": report["findings"], "wall_s": round(time.perf_counter() - started, 1)}


def format_summary(summary: dict) -> str:
    """What a person reads after `dcdit quickstart`: where everything is, the runs, the findings."""
    minutes, seconds = divmod(int(summary["wall_s"]), 60)
    quality = "fid" if any("fid" in r for r in summary["runs"]) else "fd"
    lines = [f"quickstart finished in {minutes}m{seconds:02d}s: sweep {summary['sweep']} "
             f"(MLflow parent run {summary['mlflow_run_id']})", "",
             f"  report:      {summary['report_html']}", f"  markdown:    {summary['report_md']}",
             f"  csv:         {summary['report_csv']}",
             f"  figures:     {summary['figures']}/ (boundary maps per run, Pareto, kept fraction)",
             f"  checkpoints: {summary['checkpoints']}/RUN/ (`dcdit eval` takes them)",
             f"  MLflow:      {summary['mlflow_ui']}",
             f"               then open http://127.0.0.1:5000 (experiment {summary['experiment']})", ""]
    header = ("run", "arch", "N", "lambda", "GFLOPs/image", quality.upper(), "detail AUC")
    rows = [header] + [(r["name"], r["arch"] or "-", _f(r.get("N")), _f(r.get("lambda")), _f(r.get("gflops")),
                        _f(r.get(quality)), _f(r.get("detail_auc"))) for r in summary["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for key in ("detail", "timestep", "quality"):
        items = summary["findings"].get(key, [])
        if items:
            lines += ["", *(f"  - {line}" for line in items)]
    short = [line for line in summary["findings"].get("caveats", []) if line.startswith("Too short")]
    if short:
        lines += ["", *(f"  - {line}" for line in short)]
    return "\n".join(lines)


def _f(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


__all__ = ["run_quickstart", "format_summary", "default_config", "write_sweep_file"]
