"""`dcdit fid`: the Frechet distance between two inputs (image folders, sample npz files, statistics npz files),
in one process, with the evaluator's extractors and float64 statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dcdit.errors import DCDiTError
from dcdit.features import INCEPTION
from dcdit.metrics import FeatureStats, Moments, frechet_distance
from dcdit_platform.evaluation.extractors import (DEFAULT_SYNTHETIC, ExtractorSpec, fid_default_extractor,
                                                  prepare_extractor)
from dcdit_platform.evaluation.metrics import accumulate, biased_estimates
from dcdit_platform.evaluation.npz_files import npz_moments, read_npz, save_statistics
from dcdit_platform.evaluation.sources import IMAGE_EXTENSIONS, decode_image, list_images
from dcdit_platform.storage import open_storage


@dataclass
class FidInput:
    """One side of the comparison: its statistics, from images ("images") or read from a file ("stats")."""

    label: str
    kind: str  # "images" | "stats"
    pool: Moments | FeatureStats | None = None
    spatial: Moments | FeatureStats | None = None
    n: int | None = None


def fid_input(path: str, extractor, spec: ExtractorSpec, *, batch_size: int = 64) -> FidInput:
    """Statistics of an image folder, a sample npz (arr_0 uint8 NHWC) or a statistics npz."""
    if path.lower().endswith(".npz"):
        arrays, _ = read_npz(path)
        if "arr_0" in arrays and "mu" not in arrays and "sum" not in arrays:
            images = arrays["arr_0"]
            if images.dtype != np.uint8 or images.ndim != 4:
                raise DCDiTError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
            stats = _statistics((images[i:i + batch_size] for i in range(0, len(images), batch_size)), extractor)
            return FidInput(path, "images", stats.get("pool"), stats.get("spatial"), len(images))
        pool, spatial = npz_moments(arrays, path, spec)
        return FidInput(path, "stats", pool, spatial, pool.n)
    storage = open_storage(path)
    if not storage.isdir():
        raise DCDiTError(f"{path} is neither an image folder nor an npz file")
    files = list_images(storage)
    if not files:
        raise DCDiTError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    stats = _statistics(_same_size_batches(storage, files, batch_size), extractor)
    return FidInput(path, "images", stats.get("pool"), stats.get("spatial"), len(files))


def _same_size_batches(storage, files: list[str], batch_size: int) -> Iterator[np.ndarray]:
    """Batches of decoded images; a batch ends early where the image size changes."""
    batch: list[np.ndarray] = []
    for rel in files:
        with storage.open_input(rel) as f:
            image = np.asarray(decode_image(f.read(), storage.join(rel)).convert("RGB"))
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)


def _statistics(batches: Iterable[np.ndarray], extractor) -> dict[str, FeatureStats]:
    stats: dict[str, FeatureStats] = {}
    for images in batches:
        accumulate(stats, extractor(images))
    return stats


def fid_between(input1: str, input2: str, *, extractor: str | None = None, weights: str | None = None,
                batch_size: int = 64, save_stats: str | None = None, echo: Callable[[str], None] | None = None) -> dict:
    """FID (FD for other extractors; sFID when both sides have spatial statistics) between two inputs. Without
    `extractor`: Inception when its weights are here, else (offline) the default synthetic data's domain
    classifier, said on `echo`; the domain classifier without `weights` is that one, trained once and cached."""
    if not 1 <= batch_size <= 4096:
        raise DCDiTError(f"--batch-size must be in [1, 4096], got {batch_size}")
    if extractor is None:
        extractor, why = fid_default_extractor(weights)
        if why and echo:
            echo(why)
    spec, ex = prepare_extractor(extractor, weights, domain_source=dict(DEFAULT_SYNTHETIC), build=True,
                                 echo=echo)
    ex.batch_size = batch_size
    sides = [fid_input(p, ex, spec, batch_size=batch_size) for p in (input1, input2)]
    name = "fid" if extractor == INCEPTION else "fd"
    out: dict[str, Any] = {"input1": input1, "input2": input2, "extractor": spec.name,
                           "weights_sha256": spec.weights_sha256, "n1": sides[0].n, "n2": sides[1].n}
    with biased_estimates() as caught:
        out[name] = frechet_distance(sides[0].pool, sides[1].pool, name=name.upper())
        if sides[0].spatial is not None and sides[1].spatial is not None:
            out["sfid"] = frechet_distance(sides[0].spatial, sides[1].spatial, name="sFID")
    if caught:
        out["warnings"] = sorted(set(caught))
    if save_stats:
        side = sides[0]
        if not isinstance(side.pool, FeatureStats):
            raise DCDiTError("--save-stats saves the statistics of INPUT1, which must be images")
        save_statistics(save_stats, side.pool, side.spatial, spec)
        out["saved_stats"] = save_stats
    return out
