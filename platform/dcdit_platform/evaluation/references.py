"""The reference side of the comparison: statistics read from an npz (ADM reference batch or statistics file), or
computed once by the actors from a dataset, folder or synthetic reference and cached in storage under a key of the
images' identity, the extractor and the selection of images.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray

from dcdit.errors import DCDiTError
from dcdit.metrics import FeatureStats, Moments
from dcdit_platform.evaluation.actors import ExtractTask
from dcdit_platform.evaluation.extractors import CACHE_DIR, ExtractorSpec
from dcdit_platform.evaluation.metrics import Collected
from dcdit_platform.evaluation.npz_files import npz_moments, read_npz, write_statistics
from dcdit_platform.evaluation.pool import ActorPool
from dcdit_platform.evaluation.protocol import EvalConfig, shards_of
from dcdit_platform.evaluation.sources import ArrayImages, ImageSource, dataset_source, parse_synthetic, \
    synthetic_source

REFERENCE_VERSION = 1  # bump when reference statistics change meaning; part of their cache key


@dataclass
class Reference:
    """Reference side of the comparison: statistics (pool, optional spatial) and optional features for PR/KID."""

    label: str  # what the user passed / what it is
    reference_id: str  # short id recorded in the protocol
    pool: Moments | FeatureStats
    spatial: Moments | FeatureStats | None = None
    features: np.ndarray | None = None  # pool features of up to pr_reference_samples images
    cached: bool = False
    key: str | None = None


def reference_key(source_identity: dict, spec: ExtractorSpec, selection: dict) -> str:
    body = {"source": source_identity, "extractor": spec.identity, "selection": selection,
            "version": REFERENCE_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


def reference_selection(size: int, count: int, seed: int = 0) -> np.ndarray:
    """The reference images used: all of them, or a seeded random subset of `count` (in a random order, so any
    prefix is itself a random subset: the first pr_reference_samples serve precision/recall and KID)."""
    order = np.random.default_rng([seed, size]).permutation(size)
    return order[:min(count, size)].astype(np.int64)


def resolve_reference(ref_spec: str, synthetic_params: dict | None, spec: ExtractorSpec, storage, pool: ActorPool,
                      cfg: EvalConfig, image_size: int, metrics: set[str], *,
                      echo: Callable[[str], None]) -> Reference:
    """The reference statistics: from an npz, or computed once from a dataset and cached in storage."""
    want_features = bool(metrics & {"pr", "kid"}) and cfg.pr_reference_samples > 0
    given: tuple = (None, None)  # an npz's own (pool, spatial) statistics: they win over computed ones
    if ref_spec.lower().endswith(".npz"):
        arrays, sha = read_npz(ref_spec)
        if "mu" in arrays or "sum" in arrays or "arr_0" not in arrays:
            given = npz_moments(arrays, ref_spec, spec)
        if "arr_0" not in arrays and want_features:
            warnings.warn(f"{ref_spec} holds statistics only (no arr_0 images): precision, recall and KID are "
                          "skipped", stacklevel=2)
        if "arr_0" not in arrays:
            return Reference(ref_spec, f"npz:{sha[:12]}", *given)
        source = _npz_images(arrays.pop("arr_0"), ref_spec, sha)
        if given[0] is not None and not want_features:
            return Reference(ref_spec, f"npz:{sha[:12]}", *given)
        # ADM batches: mu/sigma describe the whole training set; arr_0 (10K images) serves precision/recall.
        count = source.size if given[0] is None else min(source.size, cfg.pr_reference_samples)
    else:
        if ref_spec == "synthetic" or ref_spec.startswith("synthetic:"):
            source = synthetic_source(synthetic_params if ref_spec == "synthetic" else parse_synthetic(ref_spec))
        else:
            source = dataset_source(ref_spec, crop=image_size)
        count = min(source.size, cfg.reference_samples)
    pr_count = min(count, cfg.pr_reference_samples) if want_features else 0
    selection = {"count": count, "pr_count": pr_count, "order": "seeded permutation [0, size]"}
    key = reference_key(source.identity, spec, selection)
    rel = f"{CACHE_DIR}/fid-references/{key}.npz"
    ref_id = f"{source.identity['kind']}:{key[:12]}"
    if storage.exists(rel):
        arrays, _ = read_npz(storage.join(rel))
        spatial = FeatureStats.from_arrays(arrays, "s") if "sum_s" in arrays else None
        features = arrays.get("features")
        echo(f"reference statistics from cache {storage.join(rel)}")
        return Reference(source.label, ref_id, _first(given[0], FeatureStats.from_arrays(arrays)),
                         _first(given[1], spatial), features if features is not None and len(features) else None,
                         cached=True, key=key)
    echo(f"computing reference statistics of {count} images of {source.label} (cached afterwards)")
    merged, features = _extract(source, count, pr_count, pool, cfg, spec)
    write_statistics(storage, rel, merged.stats["pool"], merged.stats.get("spatial"),
                     features=features.astype(np.float32),
                     meta=np.array(json.dumps({"source": source.identity, "extractor": spec.identity,
                                               "selection": selection, "label": source.label})))
    return Reference(source.label, ref_id, _first(given[0], merged.stats["pool"]),
                     _first(given[1], merged.stats.get("spatial")), features if len(features) else None, key=key)


def _npz_images(images: np.ndarray, where: str, sha: str) -> ArrayImages:
    """An npz's arr_0 as a reference source, put in the object store once for all actors."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DCDiTError(f"{where}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return ArrayImages(identity={"kind": "npz", "sha256": sha}, size=len(images), label=where,
                       array=ray.put(images))


def _extract(source: ImageSource, count: int, pr_count: int, pool: ActorPool, cfg: EvalConfig,
             spec: ExtractorSpec) -> tuple[Collected, np.ndarray]:
    """Statistics of the selected `count` images, and the pool features of the first `pr_count` of them."""
    chosen = reference_selection(source.size, count)
    tasks, orders = [], []
    for i, (a, b) in enumerate(shards_of(count, cfg.shard_size)):
        idx = chosen[a:b]
        order = np.argsort(idx, kind="stable")  # read in storage order; statistics do not depend on row order
        tasks.append(ExtractTask(shard=i, source=source, indices=idx[order], batch_size=cfg.batch_size,
                                 keep=("pool",) if a < pr_count else ()))
        orders.append(order)
    merged = Collected()
    parts = []
    for order, result in zip(orders, pool.run(tasks)):
        merged.add_stats(result.stats)
        if result.features.get("pool") is not None:
            restored = np.empty_like(result.features["pool"])
            restored[order] = result.features["pool"]  # back to selection order
            parts.append(restored)
    features = np.concatenate(parts)[:pr_count] if parts else np.zeros((0, spec.dims["pool"]), np.float32)
    return merged, features


def _first(preferred, fallback):
    """An npz's own statistics win over those computed from its images."""
    return preferred if preferred is not None else fallback
