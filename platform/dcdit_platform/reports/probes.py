"""The router probe of each routed run in a report: find the run's latest checkpoint on storage, route held-out
synthetic images through its EMA weights (the math is dcdit.probe), draw its boundary maps and log the AUCs into the
run as `report/...` metrics at the checkpoint's step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dcdit.data.synthetic import CLASS_NAMES
from dcdit.diffusion import create_diffusion
from dcdit.errors import DCDiTError
from dcdit.models.family import family_of
from dcdit.probe import probe_router, probe_timesteps, synthetic_probe_images
from dcdit_platform.reports.figures import boundary_figure
from dcdit_platform.reports.records import Probe, RunRow, Sweep, file_slug
from dcdit_platform.runs import open_checkpoint
from dcdit_platform.secrets import redact
from dcdit_platform.tracking import RUN_NAME_TAG, Tracker


def probe_runs(sweep: Sweep, tracker: Tracker, out_dir: Path, *, storage: str | None = None, num_images: int = 64,
               seed: int = 0, log: bool = True, echo: Callable[[str], None] | None = None) -> None:
    """Fill `row.probe` (or `row.probe_note`) for every routed run trained on the synthetic data; log the AUCs into
    the run as `report/detail_auc_tXXXX` metrics at the checkpoint's step."""
    for row in sweep.rows:
        if not row.routed:
            continue
        if row.config.get("data.source") not in ("synthetic", None):
            row.probe_note = "trained on a dataset without detail masks (only the synthetic data has them)"
            continue
        candidates = checkpoint_locations(row, storage, sweep.name)
        if not candidates:
            row.probe_note = "no checkpoint location recorded (pass --storage)"
            continue
        figure = out_dir / "figures" / f"boundaries_{file_slug(row.name)}.png"
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
            echo(f"{row.name}: detail AUC {row.probe.result.mean_auc:.3f} (mean over t), {row.probe.result.verdict}")
        if log:
            log_probe(tracker, row.run_id, row.probe)


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no EMA weights": the raw weights are still worth probing
        ckpt = open_checkpoint(uri)
    config, m = ckpt.config, ckpt.config.model
    family = family_of(m)
    if not family.routed or not config.data.is_synthetic:
        raise DCDiTError(f"{uri} is not a DC-DiT trained on the synthetic data")
    model = family.build(m)
    model.load_state_dict(ckpt.weights)
    model.eval().requires_grad_(False)
    d = config.data
    # Held-out images: the synthetic dataset renders any index, and the training set is [0, num_samples).
    images = synthetic_probe_images(np.arange(d.num_samples, d.num_samples + num_images), seed=config.data_seed,
                                    image_size=d.image_size, num_classes=d.num_classes, model_classes=m.num_classes,
                                    grid_size=m.input_size)
    timesteps = probe_timesteps(config.diffusion.num_timesteps)
    diffusion = create_diffusion(num_timesteps=config.diffusion.num_timesteps, learn_sigma=m.learn_sigma)
    result = probe_router(model, diffusion, images, timesteps, seed=seed)
    probe = Probe(checkpoint=ckpt.uri, step=ckpt.step, result=result)
    if figure_path is not None:
        shown = [0, 3, 4, 6] if d.num_classes > 6 else list(range(min(4, num_images)))
        shown = [i for i in shown if i < num_images]
        batch = images.batch
        probe.figure = str(boundary_figure(batch.images[shown], images.masks[shown], [p[shown] for p in result.probs],
                                           timesteps, figure_path, title=title,
                                           labels=[_class_name(int(batch.labels[i])) for i in shown]))
    return probe


def _class_name(label: int) -> str:
    return CLASS_NAMES[label] if 0 <= label < len(CLASS_NAMES) else str(label)


def log_probe(tracker: Tracker, run_id: str, probe: Probe) -> None:
    """The probe's AUCs and kept fractions as `report/...` metrics of the run, once per checkpoint step."""
    result, step = probe.result, int(probe.step or 0)
    history = tracker.metric_history(run_id, "report/detail_auc")
    if any(m.step == step for m in history):
        return  # the probe is deterministic for a checkpoint: logged once
    metrics = {"report/detail_auc": result.mean_auc, "report/detail_auc_clean": result.clean_auc}
    for t, a, k in zip(result.timesteps, result.auc, result.kept):
        metrics[f"report/detail_auc_t{t:04d}"] = a
        metrics[f"report/kept_fraction_t{t:04d}"] = k
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if math.isfinite(v)}, step)
