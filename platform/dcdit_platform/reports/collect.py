"""Reading a sweep back from MLflow: the parent run (by name or id), its child runs, and for each run its config,
last metrics, metric histories, evaluations and sample grids, as the rows a report is made of.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dcdit.config import ModelConfig, from_dict
from dcdit.errors import DCDiTError
from dcdit.models import count_params
from dcdit.models.family import FAMILIES
from dcdit_platform.config import parse_yaml
from dcdit_platform.reports.protocols import protocol_of
from dcdit_platform.reports.ranking import group_by_protocol
from dcdit_platform.reports.records import Evaluation, RunRow, Sweep, file_slug
from dcdit_platform.tracking import EVAL_PROTOCOL_TAG, PARENT_TAG, RUN_NAME_TAG, Tracker

KEPT_BUCKET = re.compile(r"router/kept_fraction_t(\d+)_(\d+)$")
EVAL_METRIC = re.compile(r"eval/(?P<slug>[^/]+)/(?:rho(?P<rho>[0-9.eE+-]+)/)?(?P<key>[^/]+)$")
STABLE_EVAL = re.compile(r"eval/(?P<key>[^/]+)$")  # the run's default protocol (tag EVAL_PROTOCOL_TAG names it)
RUN_ID = re.compile(r"[0-9a-f]{32}")
HISTORIES = ("train/loss", "train/diffusion_loss", "router/kept_fraction", "router/compression_effective",
             "router/compression_natural", "train/ratio_loss", "optim/router_grad_norm")


def find_parent(tracker: Tracker, ref: str):
    """The sweep's parent run from a run id or a name (the newest top-level run of that name wins)."""
    if RUN_ID.fullmatch(ref):
        try:
            return tracker.get_run(ref)
        except DCDiTError:
            pass  # a 32-hex name is possible: look it up by name below
    quoted = ref.replace("\\", "\\\\").replace("'", "\\'")
    found = {}
    for query in (f"tags.`{RUN_NAME_TAG}` = '{quoted}'", f"attributes.run_name = '{quoted}'"):
        for run in tracker.search_runs(query, order_by=["attributes.start_time DESC"]):
            found[run.info.run_id] = run
    if not found:
        raise DCDiTError(f"no MLflow run named {ref!r} at {tracker.display_uri}: pass the sweep's name or its parent "
                         "run id, and the --tracking-uri (or --storage) it was tracked with")
    runs = sorted(found.values(), key=lambda r: r.info.start_time or 0, reverse=True)
    top = [r for r in runs if PARENT_TAG not in r.data.tags]
    return (top or runs)[0]


def collect(tracker: Tracker, ref: str) -> Sweep:
    """The parent run, its children and everything the report shows about them (no checkpoints read yet)."""
    parent = find_parent(tracker, ref)
    exp_id = parent.info.experiment_id
    children = tracker.search_runs(f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", experiment_ids=[exp_id],
                                   order_by=["attributes.start_time ASC"])
    runs = children or [parent]  # a single training run reports on itself
    experiment = tracker.get_experiment(exp_id)
    rows = sorted((run_row(tracker, run) for run in runs), key=_row_order)
    notes = []
    if not children:
        notes.append(f"run {parent.info.run_id} has no child runs: this report shows the run itself")
    return Sweep(parent_id=parent.info.run_id, name=_run_name(parent), experiment=experiment.name,
                 tracking_uri=tracker.display_uri, rows=rows, groups=group_by_protocol(rows), notes=notes)


def _run_name(run) -> str:
    return run.data.tags.get(RUN_NAME_TAG) or run.info.run_name or run.info.run_id


def _row_order(row: RunRow):
    # Baselines (known families without a router) first, then routed runs by N and lambda.
    return (row.family is None or row.routed, row.n or 0.0, row.lam or 0.0, row.name)


def parse_value(text: str | None) -> Any:
    """An MLflow param (always a string) back to a number, bool, None or list where it was one."""
    if text is None:
        return None
    try:
        return parse_yaml(text)
    except DCDiTError:
        return text


def run_row(tracker: Tracker, run) -> RunRow:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    config = {k: parse_value(v) for k, v in params.items() if not k.startswith("eval/")}
    arch = config.get("model.arch")
    routed = arch in FAMILIES and FAMILIES[arch].routed
    model_cfg = model_config(config)
    kept = metrics.get("router/kept_fraction")
    row = RunRow(
        run_id=run.info.run_id, name=_run_name(run), status=run.info.status, arch=arch,
        model=config.get("model.preset") or _describe(model_cfg, arch),
        n=_float(config.get("model.downsample_factor")) if routed else None,
        lam=_float(config.get("train.chunking.ratio_loss_weight")) if routed else None,
        params=_params(model_cfg), forward_gflops=_forward_gflops(model_cfg, kept),
        compression=metrics.get("router/compression_effective"), kept_fraction=kept,
        steps=_last_step(tracker, run.info.run_id, "train/loss"), images_per_s=metrics.get("perf/images_per_s"),
        diffusion_loss=metrics.get("train/diffusion_loss"), config=config, tags=dict(tags))
    row.evaluations = evaluations_of(run)
    # A distance per evaluated checkpoint (logged at its step): the quality curve of the run, filed under
    # eval/<slug>/<distance> whether MLflow holds it there or under the default protocol's stable key.
    default = tags.get(EVAL_PROTOCOL_TAG)
    curves = {f"eval/{e.slug}/{e.distance}": f"eval/{e.distance}" if e.slug == default else
              f"eval/{e.slug}/{e.distance}" for e in row.evaluations if e.rho is None}
    for name, key in [*((k, k) for k in HISTORIES), *sorted(curves.items())]:
        if key in metrics:
            row.histories[name] = [(m.step, m.value) for m in sorted(tracker.metric_history(run.info.run_id, key),
                                                                       key=lambda m: (m.step, m.timestamp))]
    row.kept_by_t = kept_by_timestep(tracker, run)
    return row


def model_config(config: dict[str, Any]) -> ModelConfig | None:
    """The run's ModelConfig from its flattened params, or None when they do not describe one."""
    data = {k[len("model."):]: v for k, v in config.items() if k.startswith("model.") and k != "model.preset"}
    if not data:
        return None
    try:
        return from_dict(ModelConfig, data)
    except (DCDiTError, TypeError, ValueError):
        return None


def _describe(model_cfg: ModelConfig | None, arch: str | None) -> str | None:
    """How the tables name the model ("DiT 12x384/2"), else its bare arch."""
    if model_cfg is None or model_cfg.arch not in FAMILIES:
        return arch
    return FAMILIES[model_cfg.arch].describe(model_cfg)


def _params(model_cfg: ModelConfig | None) -> int | None:
    if model_cfg is None:
        return None
    try:
        return int(count_params(model_cfg))
    except Exception:  # noqa: BLE001 - a config this code cannot build is shown without a count
        return None


def _forward_gflops(model_cfg: ModelConfig | None, kept_fraction: float | None) -> float | None:
    """Analytic FLOPs (2 per MAC) of one forward pass of one sample; routed models at their realised kept
    fraction."""
    if model_cfg is None or model_cfg.arch not in FAMILIES:
        return None
    family = FAMILIES[model_cfg.arch]
    fraction = kept_fraction if family.routed and kept_fraction and 0 < kept_fraction <= 1 else None
    try:
        return 2 * family.forward_macs(model_cfg, fraction).gmacs
    except DCDiTError:
        return None


def _float(value) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _last_step(tracker: Tracker, run_id: str, key: str) -> int | None:
    history = tracker.metric_history(run_id, key)
    return max((m.step for m in history), default=None)


def _eval_key(key: str, default: str | None) -> tuple[str, str | None, str] | None:
    """(slug, rho, name) of an evaluation metric or param: eval/<slug>/[rho<r>/]<name>, or eval/<name> of the
    run's default protocol `default` (runs evaluated before stable keys have none)."""
    match = EVAL_METRIC.fullmatch(key)
    if match:
        return match.group("slug"), match.group("rho"), match.group("key")
    match = STABLE_EVAL.fullmatch(key)
    return (default, None, match.group("key")) if match and default else None


def evaluations_of(run) -> list[Evaluation]:
    """The run's evaluation metrics and params (eval/<slug>/... and the default protocol's eval/...), one Evaluation
    per (slug, rho)."""
    default = run.data.tags.get(EVAL_PROTOCOL_TAG)
    entries: dict[tuple[str, str | None], Evaluation] = {}
    protocols: dict[str, dict[str, str]] = {}
    for key, value in run.data.params.items():
        parsed = _eval_key(key, default)
        if parsed and not parsed[1]:
            protocols.setdefault(parsed[0], {})[parsed[2]] = value
    for key, value in run.data.metrics.items():
        parsed = _eval_key(key, default)
        if not parsed:
            continue
        slug, rho, name = parsed
        entry = entries.get((slug, rho))
        if entry is None:
            params = protocols.get(slug, {})
            rho_value = _float(rho) if rho is not None else _float(parse_value(params.get("rho")))
            entry = entries[(slug, rho)] = Evaluation(slug=slug, rho=rho_value, protocol=protocol_of(params),
                                                      metrics={}, checkpoint=params.get("checkpoint"))
        entry.metrics[name] = value
    out = [e for e in entries.values() if e.distance]
    return sorted(out, key=lambda e: (e.slug, e.rho if e.rho is not None else -1))


def kept_by_timestep(tracker: Tracker, run) -> dict[int, float]:
    """Kept fraction per timestep bucket, averaged over the second half of training (a single logging window
    holds few samples per bucket)."""
    out = {}
    for key in run.data.metrics:
        match = KEPT_BUCKET.match(key)
        if not match:
            continue
        history = tracker.metric_history(run.info.run_id, key)
        if not history:
            continue
        last = max(m.step for m in history)
        late = [m.value for m in history if m.step >= last / 2]
        out[(int(match.group(1)) + int(match.group(2)) + 1) // 2] = float(np.mean(late))
    return dict(sorted(out.items()))


def fetch_samples(tracker: Tracker, row: RunRow, dst: Path) -> None:
    """The evaluations' sample grids (eval/<slug>/samples*.png artifacts), one per slug, when they exist."""
    for slug in sorted({ev.slug for ev in row.evaluations}):
        try:
            names = [a.path for a in tracker.list_artifacts(row.run_id, f"eval/{slug}") if a.path.endswith(".png")]
        except DCDiTError:
            continue
        grids = [n for n in names if Path(n).name.startswith("samples")]
        if not grids:
            continue
        target = dst / f"{file_slug(row.name)}-{slug}"
        target.mkdir(parents=True, exist_ok=True)
        try:
            row.samples[slug] = tracker.download_artifact(row.run_id, sorted(grids)[0], target)
        except DCDiTError:
            continue
