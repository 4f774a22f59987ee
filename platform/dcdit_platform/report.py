"""Sweep reports: the MLflow runs of a sweep (parent and children) become one row per run, evaluations grouped by
protocol (never ranked across protocols), figures (quality vs GFLOPs with the Pareto front, kept fraction vs
timestep, loss curves, boundary maps on real samples) and the detail check (do DC-DiT's boundaries follow the
synthetic images' detail masks?), written as a self-contained HTML page, Markdown and CSV and attached to the
sweep's parent run.

Everything is read back from MLflow (and, for the detail check, from each run's latest checkpoint), so a report can
be rebuilt at any time from any machine that reaches the tracking server and the storage.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcdit.errors import DCDiTError
from dcdit_platform.secrets import redact
from dcdit_platform.tracking import PARENT_TAG, RUN_NAME_TAG, Tracker

# The fields of an evaluation that change its numbers (evaluate.PROTOCOL_PARAMS minus per-run bookkeeping): two
# evaluations are ranked together only when all of them are equal.
PROTOCOL_KEYS = ("num_samples", "sampler", "steps", "cfg_scale", "lite_cfg", "extractor", "weights_sha256",
                 "reference_id", "seed", "num_classes", "image_size", "vae")
PROTOCOL_LABELS = {"num_samples": "samples", "sampler": "sampler", "steps": "steps", "cfg_scale": "cfg",
                   "lite_cfg": "Lite-CFG", "extractor": "extractor", "weights_sha256": "weights",
                   "reference_id": "reference", "seed": "seed", "num_classes": "classes",
                   "image_size": "image size", "vae": "VAE"}
QUALITY_KEYS = ("fid", "fd", "sfid", "is_mean", "kid_mean", "kd_mean", "precision", "recall", "class_accuracy")
KEPT_BUCKET = re.compile(r"router/kept_fraction_t(\d+)_(\d+)$")
EVAL_METRIC = re.compile(r"eval/(?P<slug>[^/]+)/(?:rho(?P<rho>[0-9.eE+-]+)/)?(?P<key>[^/]+)$")
RUN_ID = re.compile(r"[0-9a-f]{32}")
PROBE_FRACTIONS = (0.95, 0.75, 0.5, 0.25, 0.05)  # probed timesteps as fractions of T, noisy -> clean
CSV_COLUMNS = ("run_id", "name", "status", "arch", "model", "N", "lambda", "params", "forward_gflops", "compression",
               "kept_fraction", "steps", "images_per_s", "diffusion_loss", "detail_auc", "detail_auc_clean",
               "protocol_id", "rank_in_protocol", "pareto", "rho", "distance", "gflops_per_image",
               *QUALITY_KEYS, "eval_slug", "eval_checkpoint", *(f"protocol.{k}" for k in PROTOCOL_KEYS))


# =====================================================================================================================
# What a report is made of
# =====================================================================================================================

@dataclass
class Evaluation:
    """One evaluation entry of one run: a protocol, an optional tail-drop fraction and its metrics."""

    slug: str
    rho: float | None
    protocol: dict[str, str]
    metrics: dict[str, float]
    checkpoint: str | None = None  # the evaluated checkpoint (a run may be evaluated at several)

    @property
    def protocol_id(self) -> str:
        return protocol_id(self.protocol)

    @property
    def distance(self) -> str | None:
        """'fid' (Inception features) or 'fd' (any other extractor, e.g. the synthetic domain classifier)."""
        return "fid" if "fid" in self.metrics else "fd" if "fd" in self.metrics else None

    @property
    def quality(self) -> float | None:
        return self.metrics.get(self.distance) if self.distance else None

    @property
    def gflops(self) -> float | None:
        return self.metrics.get("gflops_per_image")


@dataclass
class Probe:
    """DC-DiT's router on real synthetic images at a few timesteps: AUC of p against the detail masks, kept share."""

    checkpoint: str
    step: int | None
    timesteps: list[int]  # noisy -> clean
    auc: list[float]
    auc_low: list[float]  # 95% bootstrap interval over images
    auc_high: list[float]
    kept: list[float]  # kept fraction of tokens
    kept_on_detail: list[float]  # share of kept tokens that lie on detail
    detail_share: float  # share of all tokens that are detail
    num_images: int
    mean_low: float = float("nan")  # 95% bootstrap interval of the mean AUC over the probed timesteps
    mean_high: float = float("nan")
    figure: str | None = None  # boundary-map grid on real samples (PNG path)

    @property
    def clean_auc(self) -> float:
        """AUC at the cleanest probed timestep."""
        return self.auc[-1]

    @property
    def mean_auc(self) -> float:
        """The headline: AUC averaged over the probed timesteps (the whole sampling trajectory)."""
        values = [a for a in self.auc if math.isfinite(a)]
        return float(np.mean(values)) if values else float("nan")

    @property
    def verdict(self) -> str:
        if self.mean_low > 0.5:
            return "boundaries follow detail"
        if self.mean_high < 0.5:
            return "boundaries avoid detail (below chance)"
        return "no evidence either way (the interval includes 0.5)"


@dataclass
class RunRow:
    """One MLflow run of the sweep, as the report shows it."""

    run_id: str
    name: str
    status: str
    arch: str | None
    model: str | None
    n: float | None
    lam: float | None
    params: int | None
    forward_gflops: float | None
    compression: float | None
    kept_fraction: float | None
    steps: int | None
    images_per_s: float | None
    diffusion_loss: float | None
    evaluations: list[Evaluation] = field(default_factory=list)
    kept_by_t: dict[int, float] = field(default_factory=dict)  # bucket midpoint t -> kept fraction
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # parsed flat params
    tags: dict[str, str] = field(default_factory=dict)
    probe: Probe | None = None
    probe_note: str | None = None
    samples: dict[str, str] = field(default_factory=dict)  # eval slug -> sample grid PNG path

    @property
    def is_dcdit(self) -> bool:
        return self.arch == "dcdit"

    @property
    def label(self) -> str:
        if self.is_dcdit and self.n is not None:
            lam = f", lambda {self.lam:g}" if self.lam is not None else ""
            return f"N={self.n:g}{lam}"
        return self.model or self.name


@dataclass
class ProtocolGroup:
    """Evaluations that share a protocol: ranked together, and only with each other."""

    id: str
    protocol: dict[str, str]
    entries: list[tuple[RunRow, Evaluation]]
    ranks: dict[int, int] = field(default_factory=dict)  # index in entries -> rank (1 = best)
    pareto: set[int] = field(default_factory=set)  # indices on the quality/GFLOPs Pareto front

    @property
    def distance(self) -> str:
        names = {e.distance for _, e in self.entries if e.distance}
        return "fid" if names == {"fid"} else "fd"

    def title(self) -> str:
        return protocol_title(self.protocol)


@dataclass
class Sweep:
    parent_id: str
    name: str
    experiment: str
    tracking_uri: str
    rows: list[RunRow]
    groups: list[ProtocolGroup]
    notes: list[str] = field(default_factory=list)


# =====================================================================================================================
# Reading the sweep back from MLflow
# =====================================================================================================================

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
    rows = [run_row(tracker, run) for run in runs]
    rows.sort(key=_row_order)
    notes = []
    if not children:
        notes.append(f"run {parent.info.run_id} has no child runs: this report shows the run itself")
    sweep = Sweep(parent_id=parent.info.run_id, name=_run_name(parent), experiment=experiment.name,
                  tracking_uri=tracker.display_uri, rows=rows, groups=group_by_protocol(rows), notes=notes)
    return sweep


def _run_name(run) -> str:
    return run.data.tags.get(RUN_NAME_TAG) or run.info.run_name or run.info.run_id


def _row_order(row: RunRow):
    return (row.arch != "dit", row.n or 0.0, row.lam or 0.0, row.name)


def parse_value(text: str | None) -> Any:
    """An MLflow param (always a string) back to a number, bool, None or list where it was one."""
    if text is None:
        return None
    from dcdit_platform.config import parse_yaml

    try:
        return parse_yaml(text)
    except DCDiTError:
        return text


def run_row(tracker: Tracker, run) -> RunRow:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    config = {k: parse_value(v) for k, v in params.items() if not k.startswith("eval/")}
    arch = config.get("model.arch")
    model_cfg = model_config(config)
    n = _float(config.get("model.downsample_factor")) if arch == "dcdit" else None
    lam = _float(config.get("train.chunking.ratio_loss_weight")) if arch == "dcdit" else None
    kept = metrics.get("router/kept_fraction")
    row = RunRow(
        run_id=run.info.run_id, name=_run_name(run), status=run.info.status, arch=arch,
        model=config.get("model.preset") or _describe(model_cfg, arch),
        n=n, lam=lam, params=_params(model_cfg), forward_gflops=_forward_gflops(model_cfg, kept),
        compression=metrics.get("router/compression_effective"), kept_fraction=kept,
        steps=_last_step(tracker, run.info.run_id, "train/loss"), images_per_s=metrics.get("perf/images_per_s"),
        diffusion_loss=metrics.get("train/diffusion_loss"), config=config, tags=dict(tags))
    row.evaluations = evaluations_of(run)
    for key in ("train/loss", "train/diffusion_loss", "router/kept_fraction", "router/compression_effective"):
        if key in metrics:
            row.histories[key] = [(m.step, m.value) for m in sorted(tracker.metric_history(run.info.run_id, key),
                                                                      key=lambda m: (m.step, m.timestamp))]
    row.kept_by_t = kept_by_timestep(tracker, run)
    return row


def model_config(config: dict[str, Any]):
    """The run's ModelConfig from its flattened params, or None when they do not describe one."""
    from dcdit.config import ModelConfig, from_dict

    data = {k[len("model."):]: v for k, v in config.items() if k.startswith("model.") and k != "model.preset"}
    if not data:
        return None
    try:
        return from_dict(ModelConfig, data)
    except (DCDiTError, TypeError, ValueError):
        return None


def _describe(model_cfg, arch) -> str | None:
    if model_cfg is None:
        return arch
    if model_cfg.arch == "dit":
        return f"DiT {model_cfg.depth}x{model_cfg.hidden_size}/{model_cfg.patch_size}"
    return f"DC-DiT {model_cfg.depth}x{model_cfg.hidden_size}"


def _params(model_cfg) -> int | None:
    if model_cfg is None:
        return None
    from dcdit.flops import count_params

    try:
        return int(count_params(model_cfg))
    except Exception:  # noqa: BLE001 - a config this code cannot build is shown without a count
        return None


def _forward_gflops(model_cfg, kept_fraction: float | None) -> float | None:
    """Analytic FLOPs (2 per MAC) of one forward pass of one sample; DC-DiT at its realised kept fraction."""
    if model_cfg is None:
        return None
    from dcdit.flops import dcdit_macs, dit_macs

    try:
        if model_cfg.arch == "dit":
            return 2 * dit_macs(model_cfg).gmacs
        fraction = kept_fraction if kept_fraction and 0 < kept_fraction <= 1 else None
        return 2 * dcdit_macs(model_cfg, fraction).gmacs
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


def evaluations_of(run) -> list[Evaluation]:
    """The run's `eval/<slug>/...` metrics and params, one Evaluation per (slug, rho)."""
    entries: dict[tuple[str, str | None], Evaluation] = {}
    protocols: dict[str, dict[str, str]] = {}
    for key, value in run.data.params.items():
        match = EVAL_METRIC.fullmatch(key)
        if match and not match.group("rho"):
            protocols.setdefault(match.group("slug"), {})[match.group("key")] = value
    for key, value in run.data.metrics.items():
        match = EVAL_METRIC.fullmatch(key)
        if not match:
            continue
        slug, rho = match.group("slug"), match.group("rho")
        entry = entries.get((slug, rho))
        if entry is None:
            params = protocols.get(slug, {})
            rho_value = _float(rho) if rho is not None else _float(parse_value(params.get("rho")))
            protocol = {k: _norm(k, params.get(k)) for k in PROTOCOL_KEYS}
            entry = entries[(slug, rho)] = Evaluation(slug=slug, rho=rho_value, protocol=protocol, metrics={},
                                                      checkpoint=params.get("checkpoint"))
        entry.metrics[match.group("key")] = value
    out = [e for e in entries.values() if e.distance]
    return sorted(out, key=lambda e: (e.slug, e.rho if e.rho is not None else -1))


_NUMERIC_PROTOCOL = ("num_samples", "steps", "cfg_scale", "seed", "num_classes", "image_size")


def _norm(key: str, value: str | None) -> str:
    """Protocol values as comparable text: '1' and '1.0' are the same cfg scale, 'None' and 'null' the same
    (hashes and ids stay verbatim: a hex digest can look like a number)."""
    if value is None or value in ("None", "null", ""):
        return "none"
    if key == "lite_cfg":
        return str(value).lower()
    if key in _NUMERIC_PROTOCOL:
        try:
            return f"{float(value):g}"
        except ValueError:
            return value
    return value


def protocol_id(protocol: dict[str, str]) -> str:
    body = json.dumps({k: protocol.get(k, "none") for k in PROTOCOL_KEYS}, sort_keys=True)
    return "P" + hashlib.sha256(body.encode()).hexdigest()[:6]


def protocol_title(protocol: dict[str, str]) -> str:
    extractor = protocol.get("extractor", "?")
    distance = "FID" if extractor == "inception-v3-compat" else "FD"
    parts = [f"{distance} ({extractor})", f"{protocol.get('num_samples')} samples",
             f"{protocol.get('sampler')} {protocol.get('steps')} steps", f"cfg {protocol.get('cfg_scale')}"]
    if protocol.get("lite_cfg") == "true":
        parts.append("Lite-CFG")
    parts.append(f"reference {protocol.get('reference_id')}")
    return ", ".join(parts)


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


# =====================================================================================================================
# Grouping and ranking
# =====================================================================================================================

def group_by_protocol(rows: list[RunRow]) -> list[ProtocolGroup]:
    """One group per distinct protocol; ranks and the Pareto front are computed inside each group only."""
    groups: dict[str, ProtocolGroup] = {}
    for row in rows:
        for ev in row.evaluations:
            group = groups.setdefault(ev.protocol_id, ProtocolGroup(ev.protocol_id, ev.protocol, []))
            group.entries.append((row, ev))
    for group in groups.values():
        scored = [(i, ev.quality) for i, (_, ev) in enumerate(group.entries) if _finite(ev.quality)]
        for rank, (i, _) in enumerate(sorted(scored, key=lambda item: item[1]), start=1):
            group.ranks[i] = rank
        points = [(i, ev.gflops, ev.quality) for i, (_, ev) in enumerate(group.entries)
                  if _finite(ev.gflops) and _finite(ev.quality)]
        group.pareto = pareto_front(points)
    # The group holding the most runs first: it is the sweep's main protocol.
    return sorted(groups.values(), key=lambda g: (-len(g.entries), g.id))


def pareto_front(points: Sequence[tuple[int, float, float]]) -> set[int]:
    """Indices of the points no other point beats on both cost and distance (lower is better for both)."""
    front = set()
    for i, cost, dist in points:
        dominated = any((c <= cost and d <= dist) and (c < cost or d < dist) for j, c, d in points if j != i)
        if not dominated:
            front.add(i)
    return front


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


# =====================================================================================================================
# The detail check: route real synthetic images through each DC-DiT's EMA weights
# =====================================================================================================================

def probe_runs(sweep: Sweep, tracker: Tracker, out_dir: Path, *, storage: str | None = None, num_images: int = 64,
               seed: int = 0, log: bool = True, echo: Callable[[str], None] | None = None) -> None:
    """Fill `row.probe` (or `row.probe_note`) for every DC-DiT run trained on the synthetic data; log the AUCs into
    the run as `report/detail_auc_tXXXX` metrics at the checkpoint's step."""
    for row in sweep.rows:
        if not row.is_dcdit:
            continue
        if row.config.get("data.source") not in ("synthetic", None):
            row.probe_note = "trained on a dataset without detail masks (only the synthetic data has them)"
            continue
        candidates = checkpoint_locations(row, storage, sweep.name)
        if not candidates:
            row.probe_note = "no checkpoint location recorded (pass --storage)"
            continue
        figure = out_dir / "figures" / f"boundaries_{_slug(row.name)}.png"
        problems = []
        for uri in candidates:
            try:
                row.probe = probe_checkpoint(uri, figure, num_images=num_images, seed=seed, title=row.name)
                break
            except (DCDiTError, FileNotFoundError, OSError) as err:
                text = " ".join(str(err).split())
                problems.append(f"none in {redact(uri)}" if text.startswith("no checkpoint at") or
                                isinstance(err, FileNotFoundError) else f"{redact(uri)}: {text[:160]}")
        if row.probe is None:
            row.probe_note = "no readable checkpoint: " + "; ".join(problems)
            continue
        if echo:
            echo(f"{row.name}: detail AUC {row.probe.mean_auc:.3f} (mean over t), {row.probe.verdict}")
        if log:
            _log_probe(tracker, row)


def checkpoint_locations(row: RunRow, storage: str | None, sweep_name: str) -> list[str]:
    """Run directories to try (the latest checkpoint in one is used): under --storage as a sweep lays trials out
    ({storage}/{sweep}/{run}) and as `dcdit train` does ({storage}/{run}), then the run's own storage tag."""
    out = []
    run_name = row.tags.get(RUN_NAME_TAG) or row.name
    if storage:
        root = storage.rstrip("/")
        out += [f"{root}/{sweep_name}/{run_name}", f"{root}/{run_name}"]
    uri = row.tags.get("dcdit.storage")
    if uri and "***" not in uri:
        out.append(uri)
    return list(dict.fromkeys(out))


def probe_checkpoint(uri: str, figure_path: Path | None, *, num_images: int = 64, seed: int = 0,
                     title: str = "") -> Probe:
    """Noise held-out synthetic images to a few timesteps, route them with the EMA weights and score p against the
    ground-truth detail masks (AUC over every token of every image; 95% interval from a bootstrap over images)."""
    import torch

    from dcdit.data.synthetic import detail_auc, mask_to_tokens, render
    from dcdit.diffusion import create_diffusion
    from dcdit.models import build_model
    from dcdit_platform.runs import open_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no EMA weights": the raw weights are still worth probing
        ckpt = open_checkpoint(uri)
    config, m = ckpt.config, ckpt.config.model
    if m.arch != "dcdit" or not config.data.is_synthetic:
        raise DCDiTError(f"{uri} is not a DC-DiT trained on the synthetic data")
    model = build_model(m)
    model.load_state_dict(ckpt.weights)
    model.eval().requires_grad_(False)
    d = config.data
    # Held-out images: the synthetic dataset renders any index, and the training set is [0, num_samples).
    batch = render(np.arange(d.num_samples, d.num_samples + num_images), seed=config.data_seed,
                   image_size=d.image_size, num_classes=d.num_classes)
    x0 = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    y = torch.from_numpy(batch.labels) % m.num_classes
    patch = d.image_size // m.input_size
    masks = mask_to_tokens(batch.masks, patch) > 0 if patch > 1 else batch.masks
    masks = np.asarray(masks, dtype=bool)
    big_t = config.diffusion.num_timesteps
    timesteps = sorted({min(big_t - 1, max(0, round(f * big_t))) for f in PROBE_FRACTIONS}, reverse=True)
    diffusion = create_diffusion(num_timesteps=big_t, learn_sigma=m.learn_sigma)
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, num_images, num_images) for _ in range(200)]
    auc, low, high, kept, on_detail, probs_at, boot_auc = [], [], [], [], [], [], []
    with torch.no_grad():
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 1000 + t))
            tt = torch.full((num_images,), t, dtype=torch.long)
            xt = diffusion.q_sample(x0, tt, noise)
            _, routing = model(xt, tt, y, return_routing=True)
            probs = routing.probs.reshape(num_images, *routing.grid_size).numpy().astype(np.float64)
            hard = routing.mask.reshape(num_images, *routing.grid_size).numpy()
            auc.append(detail_auc(probs, masks))
            samples = np.array([detail_auc(probs[b], masks[b]) for b in boots])
            boot_auc.append(samples)
            finite = samples[np.isfinite(samples)]
            low.append(float(np.percentile(finite, 2.5)) if finite.size else float("nan"))
            high.append(float(np.percentile(finite, 97.5)) if finite.size else float("nan"))
            kept.append(float(hard.mean()))
            on_detail.append(float((hard & masks).sum() / max(hard.sum(), 1)))
            probs_at.append(probs)
    # The same image resamples at every timestep, so the interval of the mean accounts for their correlation.
    means = np.nanmean(np.stack(boot_auc), axis=0)
    means = means[np.isfinite(means)]
    probe = Probe(checkpoint=ckpt.uri, step=ckpt.step, timesteps=timesteps, auc=auc, auc_low=low, auc_high=high,
                  kept=kept, kept_on_detail=on_detail, detail_share=float(masks.mean()), num_images=num_images,
                  mean_low=float(np.percentile(means, 2.5)) if means.size else float("nan"),
                  mean_high=float(np.percentile(means, 97.5)) if means.size else float("nan"))
    if figure_path is not None:
        shown = [0, 3, 4, 6] if d.num_classes > 6 else list(range(min(4, num_images)))
        shown = [i for i in shown if i < num_images]
        probe.figure = str(boundary_figure(batch.images[shown], masks[shown], [p[shown] for p in probs_at],
                                           timesteps, figure_path, title=title,
                                           labels=[_class_name(int(batch.labels[i])) for i in shown]))
    return probe


def _class_name(label: int) -> str:
    from dcdit.data.synthetic import CLASS_NAMES

    return CLASS_NAMES[label] if 0 <= label < len(CLASS_NAMES) else str(label)


def _log_probe(tracker: Tracker, row: RunRow) -> None:
    probe = row.probe
    step = int(probe.step or 0)
    history = tracker.metric_history(row.run_id, "report/detail_auc")
    if any(m.step == step for m in history):
        return  # the probe is deterministic for a checkpoint: logged once
    metrics = {"report/detail_auc": probe.mean_auc, "report/detail_auc_clean": probe.clean_auc}
    for t, a, k in zip(probe.timesteps, probe.auc, probe.kept):
        metrics[f"report/detail_auc_t{t:04d}"] = a
        metrics[f"report/kept_fraction_t{t:04d}"] = k
    tracker.log_metrics(row.run_id, {k: v for k, v in metrics.items() if math.isfinite(v)}, step)


# =====================================================================================================================
# Figures (matplotlib's object API on the Agg canvas, as in dcdit.viz)
# =====================================================================================================================

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def boundary_figure(images: np.ndarray, masks: np.ndarray, probs: list[np.ndarray], timesteps: list[int],
                    path: Path, *, title: str = "", labels: Sequence[str] | None = None) -> Path:
    """Rows = real samples; columns = image, ground-truth detail mask, then p at each timestep (noisy -> clean)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows, cols = len(images), 2 + len(timesteps)
    fig = _figure(1.25 * cols + 0.9, 1.3 * rows + 0.6)
    grid = fig.add_gridspec(rows, cols, left=0.08, right=0.88, top=1 - 0.55 / (1.3 * rows + 0.6), bottom=0.03,
                            wspace=0.06, hspace=0.06)
    for r in range(rows):
        panels = [("image", images[r], None), ("detail mask", masks[r].astype(float), "gray")]
        panels += [(f"p at t={t}", probs[s][r], "magma") for s, t in enumerate(timesteps)]
        for c, (name, data, cmap) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            if cmap is None:
                ax.imshow(data, interpolation="nearest")
            else:
                ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
                if c >= 2:
                    ax.text(0.5, -0.02, f"{100 * float((data > 0.5).mean()):.0f}% kept", transform=ax.transAxes,
                            ha="center", va="top", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0 and labels is not None:
                ax.set_ylabel(labels[r], fontsize=7)
    cax = fig.add_axes((0.9, 0.15, 0.02, 0.7))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "magma"), cax=cax)
    bar.set_label("boundary probability p", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}: router on real samples vs detail (noisy -> clean)", fontsize=9)
    return _save(fig, path)


def pareto_figure(group: ProtocolGroup, path: Path) -> Path | None:
    """Quality vs GFLOPs per image for one protocol: DiT baselines as a line, DC-DiT points per (N, lambda),
    the Pareto front (over all of them) as a dashed step line with ringed points."""
    points = [(i, row, ev) for i, (row, ev) in enumerate(group.entries) if _finite(ev.gflops) and _finite(ev.quality)]
    if not points:
        return None
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    dit = sorted([(ev.gflops, ev.quality, row) for _, row, ev in points if not row.is_dcdit], key=lambda p: p[0])
    if dit:
        ax.plot([p[0] for p in dit], [p[1] for p in dit], "-s", color="0.25", markersize=7, label="DiT baselines")
        for x, y, row in dit:
            ax.annotate(row.model or row.name, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    settings = sorted({(row.n, row.lam) for _, row, _ in points if row.is_dcdit},
                      key=lambda s: (s[0] or 0, s[1] or 0))
    markers = "o^Dvp*hX"
    for k, ((n, lam), colour) in enumerate(zip(settings, _colours(len(settings)))):
        mine = [(ev.gflops, ev.quality, ev.rho) for _, row, ev in points if row.is_dcdit and (row.n, row.lam) == (n, lam)]
        mine.sort()
        label = f"DC-DiT N={n:g}" + (f", lambda={lam:g}" if lam is not None else "")
        ax.plot([p[0] for p in mine], [p[1] for p in mine], linestyle=":" if len(mine) > 1 else "none",
                marker=markers[k % len(markers)], color=colour, markersize=7, label=label)
        for x, y, rho in mine:
            if rho:
                ax.annotate(f"rho={rho:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
    front = sorted((group.entries[i][1].gflops, group.entries[i][1].quality) for i in group.pareto)
    if front:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", linestyle="--", color="tab:red", linewidth=1, alpha=0.7)
        ax.scatter(xs, ys, s=170, facecolors="none", edgecolors="tab:red", linewidths=1.2, label="Pareto front",
                   zorder=5)
    ax.set_xlabel("GFLOPs per generated image (measured while sampling)")
    ax.set_ylabel(f"{group.distance.upper()} (lower is better)")
    ax.set_title(f"Quality vs compute - {group.id}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def timestep_figure(rows: list[RunRow], path: Path) -> Path | None:
    """Kept fraction vs diffusion timestep (training buckets and the probe on real images) and the detail AUC."""
    runs = [r for r in rows if r.is_dcdit and (r.kept_by_t or r.probe)]
    if not runs:
        return None
    with_probe = [r for r in runs if r.probe]
    fig = _figure(10.0 if with_probe else 5.5, 3.8)
    ax = fig.add_subplot(1, 2 if with_probe else 1, 1)
    for row, colour in zip(runs, _colours(len(runs))):
        if row.kept_by_t:
            ts, ks = zip(*row.kept_by_t.items())
            ax.plot(ts, ks, "-o", color=colour, markersize=4, label=f"{row.label} (training)")
        if row.probe:
            ax.plot(row.probe.timesteps, row.probe.kept, "--s", color=colour, markersize=4, alpha=0.8,
                    label=f"{row.label} (real images)")
        if row.n:
            ax.axhline(1.0 / row.n, color=colour, linewidth=0.6, linestyle=":", alpha=0.8)
    ax.invert_xaxis()
    ax.set_xlabel("diffusion timestep t (noisy -> clean)")
    ax.set_ylabel("kept fraction of tokens")
    ax.set_title("Kept fraction vs timestep (dotted: target 1/N)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    if with_probe:
        ax2 = fig.add_subplot(1, 2, 2)
        for row, colour in zip(runs, _colours(len(runs))):
            if row.probe:
                p = row.probe
                ax2.plot(p.timesteps, p.auc, "-o", color=colour, markersize=4, label=row.label)
                ax2.fill_between(p.timesteps, p.auc_low, p.auc_high, color=colour, alpha=0.15)
        ax2.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance (0.5)")
        ax2.invert_xaxis()
        ax2.set_xlabel("diffusion timestep t (noisy -> clean)")
        ax2.set_ylabel("AUC of p vs detail mask")
        ax2.set_title("Do boundaries follow detail? (95% interval)", fontsize=9)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def loss_figure(rows: list[RunRow], path: Path) -> Path | None:
    """Diffusion loss for every run (comparable between DiT and DC-DiT) and realised compression for DC-DiT."""
    runs = [r for r in rows if r.histories.get("train/diffusion_loss") or r.histories.get("train/loss")]
    if not runs:
        return None
    dc = [r for r in runs if r.histories.get("router/compression_effective")]
    fig = _figure(10.0 if dc else 5.5, 3.6)
    ax = fig.add_subplot(1, 2 if dc else 1, 1)
    for row, colour in zip(runs, _colours(len(runs))):
        history = row.histories.get("train/diffusion_loss") or row.histories["train/loss"]
        steps, values = zip(*history)
        ax.plot(steps, values, color=colour, alpha=0.35, linewidth=0.8)
        ax.plot(steps, _smooth(values), color=colour, linewidth=1.5, label=f"{row.name}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_title("Training loss (smoothed; faint: raw)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    if dc:
        ax2 = fig.add_subplot(1, 2, 2)
        colours = dict(zip([r.run_id for r in runs], _colours(len(runs))))
        for row in dc:
            steps, values = zip(*row.histories["router/compression_effective"])
            ax2.plot(steps, values, color=colours[row.run_id], label=row.label)
            if row.n:
                ax2.axhline(row.n, color=colours[row.run_id], linestyle=":", linewidth=0.8)
        ax2.set_xlabel("step")
        ax2.set_ylabel("realised compression (tokens / kept)")
        ax2.set_yscale("log")
        ax2.set_title("Realised compression (dotted: target N)", fontsize=9)
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def _smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


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
        target = dst / f"{_slug(row.name)}-{slug}"
        target.mkdir(parents=True, exist_ok=True)
        try:
            row.samples[slug] = tracker.download_artifact(row.run_id, sorted(grids)[0], target)
        except DCDiTError:
            continue


# =====================================================================================================================
# Findings: the science in plain sentences
# =====================================================================================================================

def findings(sweep: Sweep) -> dict[str, list[str]]:
    """Plain statements about detail-following, kept fraction vs timestep and quality vs compute."""
    out: dict[str, list[str]] = {"detail": [], "timestep": [], "compression": [], "quality": [], "caveats": []}
    probed = [r for r in sweep.rows if r.probe]
    for row in probed:
        p = row.probe
        a = p.mean_auc
        by_t = ", ".join(f"{x:.2f} at t={t}" for t, x in zip(p.timesteps, p.auc))
        mid = len(p.timesteps) // 2
        out["detail"].append(
            f"{row.name}: AUC {a:.3f} (95% interval {p.mean_low:.3f}-{p.mean_high:.3f}), {a - 0.5:+.3f} vs chance, "
            f"averaged over t in {{{', '.join(str(t) for t in p.timesteps)}}} ({by_t}). At t={p.timesteps[mid]}, "
            f"{100 * p.kept_on_detail[mid]:.0f}% of kept tokens lie on detail, which covers "
            f"{100 * p.detail_share:.0f}% of the image: {p.verdict}.")
    if probed:
        follow = sum(r.probe.mean_low > 0.5 for r in probed)
        avoid = sum(r.probe.mean_high < 0.5 for r in probed)
        out["detail"].insert(0, f"Boundaries follow the ground-truth detail masks in {follow} of {len(probed)} DC-DiT "
                                f"runs (mean AUC of the boundary probability over the sampling timesteps above 0.5 "
                                f"with 95% confidence; 0.5 = chance)"
                                + (f"; in {avoid} they sit on flat regions instead (AUC below 0.5)" if avoid else "")
                                + ".")
    for row in sweep.rows:
        if row.is_dcdit and row.probe is None and row.probe_note:
            out["detail"].append(f"{row.name}: not probed ({row.probe_note}).")
    for row in [r for r in sweep.rows if r.is_dcdit]:
        if row.probe:
            ts, ks, source = row.probe.timesteps, row.probe.kept, "real images"
        elif row.kept_by_t:
            ts, ks = list(reversed(row.kept_by_t)), [row.kept_by_t[t] for t in reversed(row.kept_by_t)]
            source = "training batches"
        else:
            continue
        noisy, clean = ks[0], ks[-1]
        trend = ("rises" if clean > noisy * 1.05 else "falls" if clean < noisy * 0.95 else "stays flat")
        paper = {"rises": "the paper's direction (more tokens at clean steps, 22% -> 45%)",
                 "falls": "the opposite of the paper's direction (22% -> 45% noisy -> clean)",
                 "stays flat": "not the paper's adaptivity (22% -> 45% noisy -> clean)"}[trend]
        line = (f"{row.name}: kept fraction {trend} from {100 * noisy:.1f}% at t={ts[0]} (noisy) to "
                f"{100 * clean:.1f}% at t={ts[-1]} (clean) on {source}: {paper}.")
        if row.probe and row.kept_by_t:
            tk = list(row.kept_by_t)
            line += (f" During training: {100 * row.kept_by_t[tk[-1]]:.1f}% (t~{tk[-1]}) -> "
                     f"{100 * row.kept_by_t[tk[0]]:.1f}% (t~{tk[0]}).")
        if row.n:
            line += f" Target 1/N = {100 / row.n:.1f}%."
        out["timestep"].append(line)
    for row in [r for r in sweep.rows if r.is_dcdit and r.n and _finite(r.compression)]:
        ratio = row.compression / row.n
        how = ("on target" if 0.8 <= ratio <= 1.25 else
               f"{ratio:.1f}x more than asked (the router keeps too few tokens)" if ratio > 1 else
               f"{1 / ratio:.1f}x less than asked (the router keeps too many tokens)")
        out["compression"].append(f"{row.name}: realised compression {row.compression:.2f} for target N={row.n:g} "
                                  f"(keeps {100 / row.compression:.1f}% of tokens, target {100 / row.n:.1f}%): {how}.")
    for group in sweep.groups:
        name = group.distance.upper()
        ranked = sorted(group.ranks.items(), key=lambda item: item[1])
        if not ranked:
            continue
        best_row, best_ev = group.entries[ranked[0][0]]
        text = (f"{group.id} ({group.title()}): best {name} {best_ev.quality:.4g} by {_entry_label(best_row, best_ev)}"
                + (f" at {best_ev.gflops:.3g} GFLOPs/image" if _finite(best_ev.gflops) else "") + ".")
        front = [group.entries[i] for i in sorted(group.pareto, key=lambda i: group.entries[i][1].gflops)]
        if front:
            text += " Pareto front (cheapest first): " + ", ".join(
                f"{_entry_label(r, e)} ({e.gflops:.3g} GFLOPs, {name} {e.quality:.4g})" for r, e in front) + "."
        dits = [(r, e) for r, e in group.entries if not r.is_dcdit and _finite(e.quality) and _finite(e.gflops)]
        dcs = [(r, e) for r, e in group.entries if r.is_dcdit and _finite(e.quality) and _finite(e.gflops)]
        if dits and dcs:
            beat = [(r, e) for r, e in dcs if any(e.quality < de.quality and e.gflops <= de.gflops * 1.05
                                                  for _, de in dits)]
            text += (f" {len(beat)} of {len(dcs)} DC-DiT points beat a DiT baseline with at most 5% more compute."
                     if beat else " No DC-DiT point beats a DiT baseline at equal or lower compute here.")
        out["quality"].append(text)
    if len(sweep.groups) > 1:
        out["quality"].insert(0, protocol_warning(sweep.groups))
    steps = [r.steps for r in sweep.rows if r.steps]
    if steps and max(steps) < 5000:
        out["caveats"].append(f"These runs trained for at most {max(steps)} steps: far from converged. The report "
                              "shows what the router does and how runs compare under one protocol; absolute "
                              "quality numbers are not the paper's.")
    evaluated = [e for g in sweep.groups for _, e in g.entries]
    small = sorted({int(float(e.protocol["num_samples"])) for e in evaluated
                    if e.protocol.get("num_samples", "none") != "none" and float(e.protocol["num_samples"]) < 10000})
    if small:
        out["caveats"].append(f"Distances from {', '.join(map(str, small))} samples are biased upwards and noisy "
                              "(papers use 50K); compare them only within one protocol.")
    return out


FINDING_SECTIONS = (("Do boundaries follow detail?", "detail"), ("Kept fraction vs timestep", "timestep"),
                    ("Realised compression vs target N", "compression"), ("Quality vs compute", "quality"),
                    ("Caveats", "caveats"))


def protocol_warning(groups: list[ProtocolGroup]) -> str:
    differing = [k for k in PROTOCOL_KEYS if len({g.protocol.get(k) for g in groups}) > 1]
    named = ", ".join(PROTOCOL_LABELS[k] for k in differing) or "protocol"
    return (f"WARNING: {len(groups)} different evaluation protocols (they differ in {named}). Runs are ranked only "
            "within one protocol table; numbers from different tables are not comparable.")


def _entry_label(row: RunRow, ev: Evaluation) -> str:
    return row.name + (f" rho={ev.rho:g}" if ev.rho else "")


# =====================================================================================================================
# Tables: one row per run, and per protocol group one ranked table
# =====================================================================================================================

def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def _params_text(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


RUN_HEADER = ("run", "arch", "model", "N", "lambda", "params", "GFLOPs/fwd", "compression", "steps", "images/s",
              "diff. loss", "detail AUC", "status")


def run_cells(row: RunRow) -> list[str]:
    auc = row.probe.mean_auc if row.probe else None
    return [row.name, row.arch or "-", row.model or "-", _fmt(row.n), _fmt(row.lam), _params_text(row.params),
            _fmt(row.forward_gflops), _fmt(row.compression, 3), _fmt(row.steps), _fmt(row.images_per_s, 3),
            _fmt(row.diffusion_loss), _fmt(auc, 3), row.status]


def group_header(group: ProtocolGroup) -> list[str]:
    name = group.distance.upper()
    extra = [k for k in ("kid_mean", "kd_mean", "precision", "recall", "is_mean", "class_accuracy")
             if any(k in ev.metrics for _, ev in group.entries)]
    return ["rank", "run", "arch", "N", "lambda", "rho", "GFLOPs/image", name, *[_METRIC_NAMES[k] for k in extra],
            "compression", "Pareto"], extra


_METRIC_NAMES = {"kid_mean": "KID", "kd_mean": "KD", "precision": "precision", "recall": "recall", "is_mean": "IS",
                 "class_accuracy": "class acc.", "fid": "FID", "fd": "FD", "sfid": "sFID"}


def group_rows(group: ProtocolGroup) -> list[list[str]]:
    _, extra = group_header(group)
    order = sorted(range(len(group.entries)), key=lambda i: (group.ranks.get(i, 10**9), group.entries[i][0].name))
    out = []
    for i in order:
        row, ev = group.entries[i]
        out.append([_fmt(group.ranks.get(i)), row.name, row.arch or "-", _fmt(row.n), _fmt(row.lam), _fmt(ev.rho),
                    _fmt(ev.gflops, 4), _fmt(ev.quality, 5), *[_fmt(ev.metrics.get(k), 4) for k in extra],
                    _fmt(row.compression, 3), "yes" if i in group.pareto else ""])
    return out


def csv_records(sweep: Sweep) -> list[dict[str, Any]]:
    """One record per (run, evaluation entry); a run without evaluations gets one record without quality columns.
    Floats are written in full precision (repr), as MLflow returns them."""
    records = []
    positions = {}
    for group in sweep.groups:
        for i, (row, ev) in enumerate(group.entries):
            positions[(row.run_id, ev.slug, ev.rho)] = (group, i)
    for row in sweep.rows:
        base = {"run_id": row.run_id, "name": row.name, "status": row.status, "arch": row.arch, "model": row.model,
                "N": row.n, "lambda": row.lam, "params": row.params, "forward_gflops": row.forward_gflops,
                "compression": row.compression, "kept_fraction": row.kept_fraction, "steps": row.steps,
                "images_per_s": row.images_per_s, "diffusion_loss": row.diffusion_loss,
                "detail_auc": row.probe.mean_auc if row.probe else None,
                "detail_auc_clean": row.probe.clean_auc if row.probe else None}
        if not row.evaluations:
            records.append(base)
            continue
        for ev in row.evaluations:
            group, i = positions[(row.run_id, ev.slug, ev.rho)]
            record = {**base, "protocol_id": group.id, "rank_in_protocol": group.ranks.get(i),
                      "pareto": i in group.pareto, "rho": ev.rho, "distance": ev.distance,
                      "gflops_per_image": ev.gflops, "eval_slug": ev.slug, "eval_checkpoint": ev.checkpoint,
                      **{k: ev.metrics.get(k) for k in QUALITY_KEYS},
                      **{f"protocol.{k}": ev.protocol.get(k) for k in PROTOCOL_KEYS}}
            records.append(record)
    return records


def write_csv(sweep: Sweep, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in csv_records(sweep):
            writer.writerow({k: _csv_value(record.get(k)) for k in CSV_COLUMNS})
    return path


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


# =====================================================================================================================
# Markdown and HTML
# =====================================================================================================================

def _md_table(header: Sequence[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(sweep: Sweep, facts: dict[str, list[str]], figures: dict[str, Path], out_dir: Path) -> str:
    def rel(path) -> str:
        return Path(path).relative_to(out_dir).as_posix()

    lines = [f"# Sweep report: {sweep.name}", "",
             f"MLflow parent run `{sweep.parent_id}` in experiment `{sweep.experiment}` at `{sweep.tracking_uri}`; "
             f"{len(sweep.rows)} run(s), {len(sweep.groups)} evaluation protocol(s).", ""]
    lines += [f"> {n}" for n in sweep.notes]
    lines += ["## Findings", ""]
    for title, key in FINDING_SECTIONS:
        if facts.get(key):
            lines += [f"**{title}**", ""] + [f"- {line}" for line in facts[key]] + [""]
    lines += ["## Runs", "", _md_table(RUN_HEADER, [run_cells(r) for r in sweep.rows]), "",
              "GFLOPs/fwd: analytic FLOPs of one forward pass of one sample (DC-DiT at its realised kept fraction). "
              "Compression, images/s and loss: the last logged values. Detail AUC: boundary probability vs the "
              "ground-truth detail mask, averaged over the probed timesteps (0.5 = chance).", ""]
    if sweep.groups:
        lines += ["## Quality by evaluation protocol", ""]
        if len(sweep.groups) > 1:
            lines += [f"> **{protocol_warning(sweep.groups)}**", ""]
        for group in sweep.groups:
            header, _ = group_header(group)
            lines += [f"### {group.id}: {group.title()}", "", _md_table(header, group_rows(group)), ""]
            if f"pareto_{group.id}" in figures:
                lines += [f"![quality vs GFLOPs, {group.id}]({rel(figures[f'pareto_{group.id}'])})", ""]
    else:
        lines += ["## Quality", "", "No run of this sweep has been evaluated yet (`dcdit eval CHECKPOINT`).", ""]
    for key, title in (("timestep", "Kept fraction vs timestep, detail AUC"), ("loss", "Loss curves")):
        if key in figures:
            lines += [f"## {title}", "", f"![{title}]({rel(figures[key])})", ""]
    probed = [r for r in sweep.rows if r.probe and r.probe.figure]
    if probed:
        lines += ["## Boundary maps on real samples", ""]
        for row in probed:
            p = row.probe
            lines += [f"### {row.name}", "", _md_table(["t", "AUC", "95% interval", "kept", "kept on detail"], [
                [str(t), f"{a:.3f}", f"{lo:.3f}-{hi:.3f}", f"{100 * k:.1f}%", f"{100 * kd:.0f}%"]
                for t, a, lo, hi, k, kd in zip(p.timesteps, p.auc, p.auc_low, p.auc_high, p.kept, p.kept_on_detail)]),
                "", f"![boundary maps {row.name}]({rel(p.figure)})", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#f3f3f3}
td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}
.meta{color:#555;font-size:.9em}.warn{background:#fff3cd;border:1px solid #e0b400;padding:.6em .9em;margin:.8em 0;
font-weight:600}.note{background:#eef4fb;border-left:4px solid #4a78b0;padding:.4em .8em;margin:.6em 0}
.finding li{margin:.25em 0}.figure{margin:.8em 0}.figure img{max-width:100%;border:1px solid #eee}
.caption{color:#555;font-size:.85em}code{background:#f5f5f5;padding:0 .25em}
.samples{display:flex;flex-wrap:wrap;gap:1em}.samples div{text-align:center;font-size:.8em}
.samples img{image-rendering:pixelated;width:256px}
"""


def _img(path: Path | str, alt: str, cls: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    extra = f' class="{cls}"' if cls else ""
    return f'<img{extra} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(header: Sequence[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(sweep: Sweep, facts: dict[str, list[str]], figures: dict[str, Path]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>Sweep report: {e(sweep.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Sweep report: {e(sweep.name)}</h1>",
             f'<p class="meta">MLflow parent run <code>{e(sweep.parent_id)}</code> in experiment '
             f"<code>{e(sweep.experiment)}</code> at <code>{e(sweep.tracking_uri)}</code> &middot; "
             f"{len(sweep.rows)} run(s) &middot; {len(sweep.groups)} evaluation protocol(s) &middot; generated "
             f"{e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"]
    parts += [f'<p class="note">{e(n)}</p>' for n in sweep.notes]
    parts.append("<h2>Findings</h2>")
    for title, key in FINDING_SECTIONS:
        if facts.get(key):
            items = "".join(f'<li class="{"warn" if line.startswith("WARNING") else ""}">{e(line)}</li>'
                            for line in facts[key])
            parts.append(f'<h3>{e(title)}</h3><ul class="finding">{items}</ul>')
    parts += ["<h2>Runs</h2>", _html_table(RUN_HEADER, [run_cells(r) for r in sweep.rows]),
              '<p class="caption">GFLOPs/fwd: analytic FLOPs of one forward pass of one sample (DC-DiT at its '
              "realised kept fraction). Compression, images/s and loss: the last logged values. Detail AUC: boundary "
              "probability vs the ground-truth detail mask, averaged over the probed timesteps (0.5 = chance).</p>"]
    if sweep.groups:
        parts.append("<h2>Quality by evaluation protocol</h2>")
        if len(sweep.groups) > 1:
            parts.append(f'<div class="warn" id="protocol-warning">{e(protocol_warning(sweep.groups))}</div>')
        for group in sweep.groups:
            header, _ = group_header(group)
            parts.append(f'<h3 id="{e(group.id)}">{e(group.id)}: {e(group.title())}</h3>')
            parts.append(_html_table(header, group_rows(group)))
            if f"pareto_{group.id}" in figures:
                parts.append(f'<div class="figure">{_img(figures[f"pareto_{group.id}"], f"Pareto {group.id}")}'
                             '<div class="caption">DiT baselines as a line, DC-DiT points per (N, lambda); ringed: '
                             "the Pareto front over all runs of this protocol.</div></div>")
    else:
        parts.append("<h2>Quality</h2><p>No run of this sweep has been evaluated yet.</p>")
    if "timestep" in figures:
        parts += ["<h2>Kept fraction vs timestep, detail AUC</h2>",
                  f'<div class="figure">{_img(figures["timestep"], "kept fraction vs timestep")}<div class="caption">'
                  "Solid: kept fraction per timestep bucket during training (mean over the second half). Dashed: "
                  "the router on held-out real images noised to each t. Right: AUC of the boundary probability "
                  "against the ground-truth detail masks, with a 95% bootstrap interval over images.</div></div>"]
    if "loss" in figures:
        parts += ["<h2>Loss curves</h2>", f'<div class="figure">{_img(figures["loss"], "loss curves")}</div>']
    probed = [r for r in sweep.rows if r.probe and r.probe.figure]
    if probed:
        parts.append("<h2>Boundary maps on real samples</h2>")
        for row in probed:
            p = row.probe
            parts.append(f"<h3>{e(row.name)}</h3>")
            parts.append(_html_table(["t", "AUC", "95% interval", "kept", "kept on detail"], [
                [str(t), f"{a:.3f}", f"{lo:.3f}-{hi:.3f}", f"{100 * k:.1f}%", f"{100 * kd:.0f}%"]
                for t, a, lo, hi, k, kd in zip(p.timesteps, p.auc, p.auc_low, p.auc_high, p.kept, p.kept_on_detail)]))
            parts.append(f'<div class="figure">{_img(p.figure, f"boundary maps {row.name}")}<div class="caption">'
                         f"Checkpoint {e(p.checkpoint)} (step {p.step}), EMA weights, {p.num_images} held-out "
                         "images.</div></div>")
    samples = [(r, slug, path) for r in sweep.rows for slug, path in r.samples.items()]
    if samples:
        parts.append("<h2>Samples</h2><div class=\"samples\">")
        for row, slug, path in samples:
            parts.append(f"<div>{_img(path, f'samples {row.name}')}<br>{e(row.name)}<br>{e(slug)}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# =====================================================================================================================
# The report
# =====================================================================================================================

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def resolve_tracking_uri(tracking_uri: str | None, storage: str | None) -> str:
    """--tracking-uri, else the sqlite store in --storage, else MLFLOW_TRACKING_URI, else ./dcdit-runs/mlflow.db (the
    defaults of `dcdit train` and `dcdit sweep`)."""
    from dcdit_platform.tracking import default_tracking_uri

    if tracking_uri:
        return tracking_uri
    if storage:
        return default_tracking_uri(storage)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_tracking_uri("./dcdit-runs")


def build_report(ref: str, *, tracking_uri: str | None = None, storage: str | None = None,
                 out_dir: str | os.PathLike | None = None, attach: bool = True, probe: bool = True,
                 probe_images: int = 64, echo: Callable[[str], None] | None = None) -> dict:
    """Write the report of sweep `ref` (name or parent run id) and return its summary (paths, runs, findings)."""
    echo = echo or (lambda text: print(f"dcdit report: {text}", file=sys.stderr, flush=True))
    uri = resolve_tracking_uri(tracking_uri, storage)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise DCDiTError(f"no MLflow store at {redact(uri)}: pass --tracking-uri (or the --storage the sweep used)")
    tracker = Tracker(uri, retry_timeout_s=60.0)
    sweep = collect(tracker, ref)
    out = Path(out_dir or Path("dcdit-reports") / _slug(sweep.name)).expanduser().resolve()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    echo(f"{sweep.name}: {len(sweep.rows)} run(s) from {tracker.display_uri}")
    if probe:
        probe_runs(sweep, tracker, out, storage=storage, num_images=probe_images, echo=echo)
    with tempfile.TemporaryDirectory(prefix="dcdit-report-") as tmp:
        for row in sweep.rows:
            fetch_samples(tracker, row, Path(tmp))
        figures: dict[str, Path] = {}
        for group in sweep.groups:
            path = pareto_figure(group, out / "figures" / f"pareto_{group.id}.png")
            if path:
                figures[f"pareto_{group.id}"] = path
        for key, fn in (("timestep", timestep_figure), ("loss", loss_figure)):
            path = fn(sweep.rows, out / "figures" / f"{key}.png")
            if path:
                figures[key] = path
        facts = findings(sweep)
        (out / "report.html").write_text(render_html(sweep, facts, figures))
    (out / "report.md").write_text(render_markdown(sweep, facts, figures, out))
    write_csv(sweep, out / "runs.csv")
    summary = summarize(sweep, facts, out)
    (out / "report.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    if attach:
        tracker.log_artifacts(sweep.parent_id, out, "report")
        summary["artifact_path"] = "report"
    return summary


def summarize(sweep: Sweep, facts: dict[str, list[str]], out: Path) -> dict:
    runs = []
    for row in sweep.rows:
        entry: dict[str, Any] = {"name": row.name, "run_id": row.run_id, "arch": row.arch, "model": row.model,
                                 "N": row.n, "lambda": row.lam, "params": row.params, "status": row.status,
                                 "steps": row.steps, "compression": row.compression,
                                 "forward_gflops": row.forward_gflops}
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
            entry["detail_auc"] = row.probe.mean_auc
            entry["detail_auc_interval"] = [row.probe.mean_low, row.probe.mean_high]
            entry["kept_fraction_by_t"] = dict(zip(row.probe.timesteps, row.probe.kept))
        runs.append(entry)
    return {"name": sweep.name, "mlflow_run_id": sweep.parent_id, "experiment": sweep.experiment,
            "tracking_uri": sweep.tracking_uri, "report_html": str(out / "report.html"),
            "report_md": str(out / "report.md"), "report_csv": str(out / "runs.csv"), "out_dir": str(out),
            "protocols": [{"id": g.id, "title": g.title(), "protocol": g.protocol, "runs": len(g.entries)}
                          for g in sweep.groups],
            "mixed_protocols": len(sweep.groups) > 1, "runs": runs, "findings": facts}


__all__ = ["build_report", "collect", "find_parent", "group_by_protocol", "pareto_front", "probe_checkpoint",
           "findings", "csv_records", "PROTOCOL_KEYS", "CSV_COLUMNS", "resolve_tracking_uri"]
