"""Runs for the report tests: logged into a real MLflow server in the layout training and evaluation use, or made
by hand as the report's own rows (RunRow, Evaluation) for the tests of ranking, findings and contents."""

from __future__ import annotations

import numpy as np

from dcdit_platform.config import build_config
from dcdit_platform.evaluation import PROTOCOL_PARAMS
from dcdit_platform.reports.protocols import protocol_of
from dcdit_platform.reports.records import Evaluation, RunRow
from dcdit_platform.tracking import flat_params

PROTOCOL_A = {"num_samples": 256, "sampler": "ddim", "steps": 25, "cfg_scale": 1.0, "lite_cfg": False, "seed": 0,
              "num_classes": 4, "batch_size": 64, "shard_size": 256, "extractor": "dcdit-synthetic-classifier",
              "weights_sha256": "5e1d0c0ffee0000000000000000000000000000000000000000000000000e123",
              "reference": "synthetic(seed=3)", "reference_id": "synthetic:0123456789ab", "vae": None,
              "image_size": 8, "ema": True, "rho": None}
PROTOCOL_B = {**PROTOCOL_A, "num_samples": 64, "sampler": "ddpm", "steps": 50}


def log_evaluation(tracker, run_id: str, slug: str, protocol: dict, metrics: dict, step: int) -> None:
    """An evaluation as `dcdit eval` logs it: protocol params and metrics under eval/<slug>/."""
    tracker.log_params(run_id, {f"eval/{slug}/{k}": v for k, v in protocol.items() if k in PROTOCOL_PARAMS})
    tracker.log_metrics(run_id, {f"eval/{slug}/{k}": v for k, v in metrics.items()}, step)


def log_training(tracker, run_id: str, config: dict, *, steps: int, dcdit: bool, seed: int) -> None:
    """Flattened config params and per-step metrics with the names the training loop uses."""
    cfg = build_config(config)
    tracker.log_params(run_id, flat_params(cfg.to_dict()))
    rng = np.random.default_rng(seed)
    for step in range(2, steps + 1, 2):
        loss = float(1.0 / step + 0.05 * rng.random())
        metrics = {"train/loss": loss, "train/diffusion_loss": loss * 0.98, "perf/images_per_s": 100 + rng.random(),
                   "optim/lr": 1e-3}
        if dcdit:
            kept = 0.2 + 0.05 * rng.random()
            metrics.update({"train/ratio_loss": 1.0 + rng.random() / 10, "router/kept_fraction": kept,
                            "router/compression_natural": 1 / kept, "router/compression_effective": 1 / kept})
            for b in range(5):
                metrics[f"router/kept_fraction_t{b * 200:04d}_{b * 200 + 199:04d}"] = kept * (1.2 - 0.1 * b)
        tracker.log_metrics(run_id, metrics, step)
    tracker.finish(run_id, "FINISHED")


def evaluation_metrics(rng, *, gflops: float) -> dict:
    return {"fd": float(10 + 20 * rng.random()), "kd_mean": float(rng.random() / 100), "kd_std": 0.001,
            "precision": float(rng.random()), "recall": float(rng.random()), "class_accuracy": float(rng.random()),
            "gflops_per_image": gflops, "gmacs_per_forward": gflops / 50, "sampling_seconds": 1.5,
            "samples_per_s": 170.0}


def protocol(**changes) -> dict[str, str]:
    """PROTOCOL_A (or it with `changes`) in the normalised form evaluations carry."""
    return protocol_of({k: str(v) for k, v in {**PROTOCOL_A, **changes}.items()})


def evaluation(quality: float, gflops: float, *, rho: float | None = None, slug: str = "a",
               distance: str = "fd", **protocol_changes) -> Evaluation:
    return Evaluation(slug=slug, rho=rho, protocol=protocol(**protocol_changes),
                      metrics={distance: quality, "gflops_per_image": gflops})


def report_row(name: str, arch: str | None = "dcdit", *, evaluations=(), **fields) -> RunRow:
    """A RunRow with every number unset unless given (n, lam, compression, steps, kept_by_t, ...)."""
    values = dict(run_id=f"id-{name}", name=name, status="FINISHED", arch=arch, model=None, n=None, lam=None,
                  params=None, forward_gflops=None, compression=None, kept_fraction=None, steps=None,
                  images_per_s=None, diffusion_loss=None)
    return RunRow(**{**values, **fields}, evaluations=list(evaluations))
