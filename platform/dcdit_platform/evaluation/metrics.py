"""From features to numbers: float64 statistics accumulated per batch and merged in shard order, and the metrics
computed from them (FID, or FD for non-Inception extractors; sFID, IS, KID, precision/recall, class accuracy).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dcdit.features import INCEPTION
from dcdit.generate import sample_labels
from dcdit.metrics import (BiasedEstimateWarning, FeatureStats, class_accuracy, frechet_distance, inception_score,
                           kernel_distance, precision_recall)
from dcdit_platform import console

STATISTICS = ("pool", "spatial")  # extractor outputs summarised as statistics (FID/FD and sFID)


def accumulate(stats: dict[str, FeatureStats], features: dict[str, torch.Tensor]) -> None:
    """Add one batch of extractor outputs to the running statistics."""
    for key in STATISTICS:
        if key in features:
            stats.setdefault(key, FeatureStats.empty(features[key].shape[1])).update(features[key])


@dataclass
class Collected:
    """Everything merged from a sequence of shard results, in shard order."""

    stats: dict[str, FeatureStats] = field(default_factory=dict)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    flops: float = 0.0
    flops_images: int = 0

    def add_stats(self, stats: dict[str, dict[str, np.ndarray]]) -> None:
        for key, arrays in stats.items():
            part = FeatureStats.from_arrays(arrays)
            self.stats[key] = part if key not in self.stats else self.stats[key].merge(part)

    def add(self, result) -> None:
        """Merge a ShardResult."""
        self.add_stats(result.stats)
        for key in ("pool", "logits"):
            if result.features.get(key) is not None:
                self.arrays.setdefault(key, []).append(result.features[key])
        self.flops += result.flops
        self.flops_images += result.flops_images

    def array(self, key: str) -> np.ndarray | None:
        parts = self.arrays.get(key)
        return np.concatenate(parts) if parts else None


@contextlib.contextmanager
def biased_estimates() -> Iterator[list[str]]:
    """Collects the BiasedEstimateWarning messages of the block into the yielded list (on exit), for the result's
    "warnings" instead of Python's warning output."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", BiasedEstimateWarning)
        yield messages
    messages += [str(w.message) for w in seen if issubclass(w.category, BiasedEstimateWarning)]


def compute_metrics(merged: Collected, reference, spec, metrics: set[str], num_classes: int,
                    num_samples: int) -> dict:
    """FID/FD (+ sFID, IS, KID, precision/recall, class accuracy) of merged shard results against a Reference."""
    out: dict[str, Any] = {}
    inception = spec.name == INCEPTION
    distance = "fid" if inception else "fd"
    skipped: list[str] = []
    with biased_estimates() as caught:
        out[distance] = frechet_distance(merged.stats["pool"], reference.pool, name=distance.upper())
        if "sfid" in metrics and reference.spatial is not None and "spatial" in merged.stats:
            out["sfid"] = frechet_distance(merged.stats["spatial"], reference.spatial, name="sFID")
        logits = merged.array("logits")
        if "is" in metrics and logits is not None and inception:
            out["is_mean"], out["is_std"] = inception_score(logits)
        if not inception and logits is not None:
            out["class_accuracy"] = class_accuracy(logits, sample_labels(np.arange(num_samples), num_classes))
        features = merged.array("pool")
        if features is not None and reference.features is not None:
            if "kid" in metrics:
                prefix = "kid" if inception else "kd"
                out[f"{prefix}_mean"], out[f"{prefix}_std"] = kernel_distance(
                    features, reference.features, name=prefix.upper())
            if "pr" in metrics:
                if min(len(features), len(reference.features)) > 3:
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                    out["precision"], out["recall"] = precision_recall(reference.features, features, device=device)
                else:
                    skipped.append("precision/recall skipped: needs more than 3 samples on each side")
    if skipped or caught:
        out["warnings"] = sorted(set(skipped + caught))
        for message in out["warnings"]:
            console.warn("eval", message)
    return out
