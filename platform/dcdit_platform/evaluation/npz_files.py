"""The npz files the evaluator reads and writes, local or s3://: ADM reference batches and statistics files (read),
feature statistics with what computed them (written: `dcdit fid --save-stats`, the reference cache), and ADM sample
batches streamed shard by shard (`--export-npz`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile

import numpy as np

from dcdit.errors import DCDiTError
from dcdit.features import file_sha256
from dcdit.metrics import FeatureStats, Moments
from dcdit_platform.evaluation.extractors import ExtractorSpec
from dcdit_platform.storage import open_storage


def _parent(path: str):
    """(storage of the folder holding `path`, file name)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return open_storage(parent or "."), name


def read_npz(path: str) -> tuple[dict[str, np.ndarray], str]:
    """(arrays of an npz file, its sha256) from a local path or s3:// URI."""
    storage, name = _parent(path)
    try:
        if storage.is_local:
            source, sha = storage.path(name), file_sha256(storage.path(name))
        else:
            data = storage.read_bytes(name)
            source, sha = io.BytesIO(data), hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        raise DCDiTError(f"{path} not found") from None
    try:
        with np.load(source, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise DCDiTError(f"{path} is not a readable npz file ({' '.join(str(err).split())[:120]})") from None
    return arrays, sha


def npz_moments(arrays: dict[str, np.ndarray], where: str, spec: ExtractorSpec) -> tuple[Moments, Moments | None]:
    """Statistics stored in an npz (ADM reference batch or this evaluator's cache / `dcdit fid` output), checked:
    the arrays a reader needs, their shapes against the extractor's dimensions, finite values, JSON metadata."""
    if "mu" not in arrays and "sum" not in arrays:
        raise DCDiTError(f"{where} holds neither statistics (mu, sigma) nor images (arr_0)")
    pool = _checked_moments(arrays, "", where, spec, "pool")
    meta = arrays.get("meta")
    if meta is not None:
        try:
            recorded = json.loads(str(meta))
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):
            raise DCDiTError(f"{where}: its 'meta' entry is not a JSON object; recompute the statistics with "
                             "`dcdit fid --save-stats`")
        if (recorded.get("extractor") or {}).get("weights_sha256") not in (None, spec.weights_sha256):
            warnings.warn(f"{where} was computed with other extractor weights than {spec.weights_path}: "
                          "the distance compares different feature spaces", stacklevel=2)
    spatial = None
    if ("mu_s" in arrays or "sum_s" in arrays) and "spatial" in spec.dims:
        spatial = _checked_moments(arrays, "s", where, spec, "spatial")
    return pool, spatial


def _checked_moments(arrays: dict[str, np.ndarray], prefix: str, where: str, spec: ExtractorSpec,
                     kind: str) -> Moments:
    """mu (d,) and sigma (d, d), or the sums n, sum (d,), sum_outer (d, d); finite numbers, d the extractor's."""
    sfx = f"_{prefix}" if prefix else ""
    names = (f"n{sfx}", f"sum{sfx}", f"sum_outer{sfx}") if f"sum{sfx}" in arrays else (f"mu{sfx}", f"sigma{sfx}")
    missing = [k for k in names if k not in arrays]
    if missing:
        raise DCDiTError(f"{where} holds {names[-2]} but no {missing[0]}; statistics need {' and '.join(names)}")
    for key in names:
        if arrays[key].dtype.kind not in "fiu" or not np.isfinite(arrays[key]).all():
            raise DCDiTError(f"{where}: {key} holds non-numeric, NaN or infinite values; recompute the statistics")
    vector, matrix = arrays[names[-2]], arrays[names[-1]]
    dim = spec.dims.get(kind)
    if vector.ndim != 1 or matrix.shape != (vector.size, vector.size):
        raise DCDiTError(f"{where}: {names[-2]} of shape {vector.shape} and {names[-1]} of shape {matrix.shape} "
                         "are not a vector and its square matrix")
    if vector.size != dim:
        raise DCDiTError(f"{where} holds {vector.size}-dimensional statistics but {spec.name} features have "
                         f"{dim} dimensions (statistics from another extractor?)")
    n = arrays.get(f"n{sfx}")
    if n is not None and (n.size != 1 or n.dtype.kind not in "iu" or int(n) < 2):
        raise DCDiTError(f"{where}: n{sfx}={n.reshape(-1)[:3].tolist()} must be a count of at least 2 images")
    return Moments.from_arrays(arrays, prefix)


def write_statistics(storage, rel: str, pool: FeatureStats, spatial: FeatureStats | None,
                     **extra: np.ndarray) -> None:
    """An npz with the float64 sums and ADM-compatible mu/sigma (mu_s/sigma_s for spatial features), plus `extra`."""
    arrays = {**pool.to_arrays(), **extra}
    if spatial is not None:
        arrays.update(spatial.to_arrays("s"))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(rel, buffer.getvalue())


def save_statistics(path: str, pool: FeatureStats, spatial: FeatureStats | None, spec: ExtractorSpec) -> None:
    """`dcdit fid --save-stats`: the statistics and the extractor that computed them."""
    storage, name = _parent(path)
    write_statistics(storage, name, pool, spatial, meta=np.array(json.dumps({"extractor": spec.identity})))


class NpzSampleWriter:
    """Streams an ADM-compatible sample batch: arr_0 uint8 (N, H, W, 3) written shard by shard, arr_1 labels."""

    def __init__(self, path: str, n: int, shape: tuple[int, int, int], labels: np.ndarray):
        self.target = path
        self.storage, self.name = _parent(path)
        parent = path.rstrip("/").rpartition("/")[0]
        fd, self.tmp = tempfile.mkstemp(suffix=".npz", dir=parent if self.storage.is_local else None)
        os.close(fd)
        self.n, self.shape, self.labels, self.written = n, shape, labels, 0
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.entry = self.zip.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.entry, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                          "fortran_order": False, "shape": (n, *shape)})

    def write(self, images: np.ndarray) -> None:
        self.entry.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        self.written += len(images)

    def close(self) -> str:
        self.entry.close()
        if self.written != self.n:
            raise RuntimeError(f"npz writer got {self.written} of {self.n} images")
        with self.zip.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, self.labels)
        self.zip.close()
        if self.storage.is_local:
            os.replace(self.tmp, self.storage.path(self.name))
        else:
            self.storage.upload(self.tmp, self.name)
            os.unlink(self.tmp)
        return self.target

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.zip.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
