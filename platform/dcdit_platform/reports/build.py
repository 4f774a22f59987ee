"""`build_report`: a sweep's report from MLflow (and its checkpoints, for the router probe) written as report.html,
report.md, runs.csv and report.json and attached to the sweep's parent run; the summary it returns, and the lines
`dcdit report` prints from it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcdit.errors import DCDiTError
from dcdit_platform.console import echo as console_echo
from dcdit_platform.reports.collect import collect, fetch_samples
from dcdit_platform.reports.contents import CSV_COLUMNS, csv_records, report_document
from dcdit_platform.reports.figures import draw_figures
from dcdit_platform.reports.findings import findings
from dcdit_platform.reports.probes import probe_runs
from dcdit_platform.reports.records import RunRow, Sweep, file_slug
from dcdit_platform.reports.render import render_html, render_markdown, write_csv
from dcdit_platform.runs import RUN_RECORD
from dcdit_platform.secrets import REDACTED, redact
from dcdit_platform.sweeps.state import SWEEP_RECORD
from dcdit_platform.tracking import Tracker, default_tracking_uri

# Where `dcdit report NAME` looks for a sweep or run it is not told the store of: the storage roots `dcdit train`
# and `dcdit sweep` use by default (storage.uri) and the one `dcdit quickstart` writes to (--out, then runs/).
DEFAULT_STORAGES = ("dcdit-runs", "dcdit-quickstart/runs")


def resolve_store(ref: str, tracking_uri: str | None, storage: str | None) -> tuple[str, str | None]:
    """(tracking URI, storage) of sweep or run `ref`: --tracking-uri; else the sqlite store in --storage; else
    MLFLOW_TRACKING_URI; else the store recorded by the sweep or run named `ref` in a default storage root
    (DEFAULT_STORAGES, under the working directory); else ./dcdit-runs/mlflow.db. Creates nothing."""
    if tracking_uri:
        return tracking_uri, storage
    if storage:
        return default_tracking_uri(storage, create=False), storage
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    for root in DEFAULT_STORAGES:
        recorded = _recorded_tracking_uri(Path(root) / ref)
        if recorded:
            return recorded, str(Path(root).resolve())
    return default_tracking_uri(DEFAULT_STORAGES[0], create=False), None


def _recorded_tracking_uri(folder: Path) -> str | None:
    """The tracking URI the sweep record (sweep.json) or run record in `folder` names, when usable as it is
    (a recorded URI with credentials is redacted: the caller passes --tracking-uri then)."""
    for record in (SWEEP_RECORD, RUN_RECORD):
        path = folder / record
        if path.is_file():
            try:
                uri = json.loads(path.read_text()).get("tracking_uri")
            except (OSError, ValueError):
                continue
            if uri and REDACTED not in uri:
                return uri
    return None


def build_report(ref: str, *, tracking_uri: str | None = None, storage: str | None = None,
                 out_dir: str | os.PathLike | None = None, attach: bool = True, probe: bool = True,
                 probe_images: int = 64, echo: Callable[[str], None] | None = None) -> dict:
    """Write the report of sweep `ref` (name or parent run id) and return its summary (paths, runs, findings)."""
    echo = echo or console_echo("report")
    uri, storage = resolve_store(ref, tracking_uri, storage)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        searched = "" if tracking_uri or storage else \
            f" (nor a sweep or run {ref!r} in ./{', ./'.join(DEFAULT_STORAGES)})"
        raise DCDiTError(f"no MLflow store at {redact(uri)}{searched}: pass the --storage the sweep or run used, or "
                         "its --tracking-uri")
    tracker = Tracker(uri, retry_timeout_s=60.0)
    sweep = collect(tracker, ref)
    out = Path(out_dir or Path("dcdit-reports") / file_slug(sweep.name)).expanduser().resolve()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    echo(f"{sweep.name}: {len(sweep.rows)} run(s) from {tracker.display_uri}")
    if probe:
        probe_runs(sweep, tracker, out, storage=storage, num_images=probe_images, echo=echo)
    facts = findings(sweep)
    # Sample grids live in a temporary folder: the HTML page embeds them, the Markdown cannot link them.
    with tempfile.TemporaryDirectory(prefix="dcdit-report-") as tmp:
        for row in sweep.rows:
            fetch_samples(tracker, row, Path(tmp))
        document = report_document(sweep, facts, draw_figures(sweep, out / "figures"))
        (out / "report.html").write_text(render_html(document, generated=time.strftime("%Y-%m-%d %H:%M:%S")))
    (out / "report.md").write_text(render_markdown(document, out))
    write_csv(out / "runs.csv", CSV_COLUMNS, csv_records(sweep))
    summary = summarize(sweep, facts, out)
    (out / "report.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    if attach:
        tracker.log_artifacts(sweep.parent_id, out, "report")
        summary["artifact_path"] = "report"
    return summary


def summarize(sweep: Sweep, facts: dict[str, list[str]], out: Path) -> dict:
    """What `dcdit report --json` prints and the quickstart reads: paths, protocols, one entry per run, findings."""
    return {"name": sweep.name, "mlflow_run_id": sweep.parent_id, "experiment": sweep.experiment,
            "tracking_uri": sweep.tracking_uri, "report_html": str(out / "report.html"),
            "report_md": str(out / "report.md"), "report_csv": str(out / "runs.csv"), "out_dir": str(out),
            "protocols": [{"id": g.id, "title": g.title(), "protocol": g.protocol, "runs": len(g.entries)}
                          for g in sweep.groups],
            "mixed_protocols": len(sweep.groups) > 1, "runs": [_run_summary(sweep, row) for row in sweep.rows],
            "findings": facts}


def _run_summary(sweep: Sweep, row: RunRow) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": row.name, "run_id": row.run_id, "arch": row.arch, "model": row.model,
                             "N": row.n, "lambda": row.lam, "params": row.params, "status": row.status,
                             "steps": row.steps, "compression": row.compression, "forward_gflops": row.forward_gflops}
    # The run's entry in the largest protocol group it is in, without tail dropping where there is one.
    mine = [ev for g in sweep.groups for r, ev in g.entries if r is row]
    first = [ev for ev in mine if ev.protocol_id == mine[0].protocol_id] if mine else []
    main = min(first, key=lambda ev: ev.rho or 0.0) if first else None
    entry["gflops"] = main.gflops if main is not None else None
    if main is not None:
        entry["protocol_id"] = main.protocol_id
        entry[main.distance] = main.quality
    for ev in mine:  # FD and FID when protocols with both extractors evaluated the run
        if ev.distance not in entry and not ev.rho:
            entry[ev.distance] = ev.quality
    if row.probe:
        result = row.probe.result
        entry["detail_auc"] = result.mean_auc
        entry["detail_auc_interval"] = [result.mean_low, result.mean_high]
        entry["kept_fraction_by_t"] = dict(zip(result.timesteps, result.kept))
    return entry


def format_summary(summary: dict) -> str:
    """What `dcdit report` prints without --json: where the files are, protocol warning, first findings."""
    lines = [f"report of {summary['name']} ({len(summary['runs'])} runs, MLflow parent run {summary['mlflow_run_id']} "
             f"at {summary['tracking_uri']})",
             f"  html:     {summary['report_html']}", f"  markdown: {summary['report_md']}",
             f"  csv:      {summary['report_csv']}", f"  figures:  {summary['out_dir']}/figures/ (boundary maps, "
             "Pareto, kept fraction)"]
    if summary.get("artifact_path"):
        lines.append(f"  also attached to the parent run's MLflow artifacts under {summary['artifact_path']}/")
    if summary.get("mixed_protocols"):
        lines.append(f"  warning: {len(summary['protocols'])} evaluation protocols; runs are ranked within each only")
    for key in ("detail", "timestep", "quality"):
        for line in summary["findings"].get(key, [])[:3]:
            lines.append(f"  - {line}")
    lines += [f"  - {line}" for line in summary["findings"].get("caveats", []) if line.startswith("Too short")]
    return "\n".join(lines)
