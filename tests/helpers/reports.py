"""Runs logged into a real MLflow server in the layout training and evaluation use, for the report tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dcdit_platform.config import build_config
from dcdit_platform.evaluation import PROTOCOL_PARAMS
from dcdit_platform.tracking import flat_params

PROTOCOL_A = {"num_samples": 256, "sampler": "ddim", "steps": 25, "cfg_scale": 1.0, "lite_cfg": False, "seed": 0,
              "num_classes": 4, "batch_size": 64, "shard_size": 256, "extractor": "dcdit-synthetic-classifier",
              "weights_sha256": "5e1d0c0ffee0000000000000000000000000000000000000000000000000e123",
              "reference": "synthetic(seed=3)", "reference_id": "synthetic:0123456789ab", "vae": None,
              "image_size": 8, "ema": True, "rho": None}
PROTOCOL_B = {**PROTOCOL_A, "num_samples": 64, "sampler": "ddpm", "steps": 50}


@dataclass
class Logged:
    """What a test logged, to compare the report against (the test reads MLflow back on its own too)."""

    run_id: str
    name: str
    evaluations: dict[str, dict] = field(default_factory=dict)  # slug -> metrics


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
