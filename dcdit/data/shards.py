"""Parquet shards plus a MANIFEST.json written last: the on-disk format of prepared datasets.

A dataset is a directory (local or any `pyarrow.fs.FileSystem`) of `shard-00000.parquet`, ... and a manifest
holding sample count, shape, dtype, layout, classes and the sha256 of every shard. No valid manifest, no dataset.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

# FORMAT_VERSION and LAYOUTS are read through this module too (prepare.py, dcdit.data).
from dcdit.data.manifest import (FORMAT_VERSION, LAYOUTS, MANIFEST_NAME, Manifest, ShardInfo,  # noqa: F401
                                 join, local_or, one_line, read_manifest, shard_name)
from dcdit.errors import DCDiTError


def atomic_write(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Readers never see a partial file: object stores publish an object only once its upload completes;
    elsewhere write under a temporary name and move it into place."""
    if any(store in filesystem.type_name for store in ("s3", "gcs")):
        with filesystem.open_output_stream(path) as out:
            out.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(data)
    filesystem.move(tmp, path)


def encode_shard(indices: np.ndarray, labels: np.ndarray, data: np.ndarray, masks: np.ndarray | None = None) -> bytes:
    """One shard as Parquet bytes: index int64, label int32, data (one sample's raw bytes), optional packed mask."""
    n = len(indices)
    data = np.ascontiguousarray(data)
    sample_bytes = data[0].nbytes if n else 1
    columns = {
        "index": pa.array(np.asarray(indices, dtype=np.int64)),
        "label": pa.array(np.asarray(labels, dtype=np.int32)),
        "data": pa.FixedSizeBinaryArray.from_buffers(pa.binary(sample_bytes), n, [None, pa.py_buffer(data.tobytes())]),
    }
    if masks is not None:
        packed = np.packbits(np.asarray(masks, dtype=bool).reshape(n, -1), axis=1)
        columns["mask"] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(packed.shape[1]), n,
                                                               [None, pa.py_buffer(packed.tobytes())])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink, compression="zstd", row_group_size=max(n, 1))
    return sink.getvalue().to_pybytes()


def write_shard(root: str, shard_id: int, indices, labels, data, masks=None, *,
                filesystem: pafs.FileSystem | None = None) -> ShardInfo:
    """Encode and atomically write shard `shard_id` under `root`; returns its manifest entry."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0 or np.any(np.diff(indices) != 1):
        raise DCDiTError(f"shard {shard_name(shard_id)} needs consecutive sample indices")
    payload = encode_shard(indices, labels, data, masks)
    fs = local_or(filesystem)
    fs.create_dir(root, recursive=True)
    atomic_write(fs, join(root, shard_name(shard_id)), payload)
    return ShardInfo(file=shard_name(shard_id), rows=len(indices), first_index=int(indices[0]),
                     sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))


def write_manifest(root: str, manifest: Manifest, *, filesystem: pafs.FileSystem | None = None) -> None:
    """Commit the dataset: the manifest goes last, after every shard it lists is in place."""
    payload = json.dumps(manifest.to_dict(), indent=1, sort_keys=True).encode()
    atomic_write(local_or(filesystem), join(root, MANIFEST_NAME), payload)


def write_dataset(root: str, source, *, filesystem: pafs.FileSystem | None = None, shard_size: int = 1024,
                  with_masks: bool | None = None) -> Manifest:
    """Write every sample of an in-memory source (e.g. `SyntheticDataset`) as shards plus manifest, in process."""
    n = len(source)
    if with_masks is None:
        with_masks = hasattr(source, "read_masks")
    shards = []
    for shard_id, start in enumerate(range(0, n, shard_size)):
        idx = np.arange(start, min(start + shard_size, n))
        data, labels = source.read(idx)
        masks = source.read_masks(idx) if with_masks else None
        shards.append(write_shard(root, shard_id, idx, labels, data, masks, filesystem=filesystem))
    mask_shape = tuple(source.sample_shape[:2]) if with_masks else None
    describe = source.describe() if hasattr(source, "describe") else {}
    manifest = Manifest(layout=source.layout, shape=tuple(source.sample_shape), num_classes=source.num_classes,
                        class_names=tuple(source.class_names), shards=tuple(shards), source=describe,
                        mask_shape=mask_shape)
    write_manifest(root, manifest, filesystem=filesystem)
    return manifest


@dataclass
class _Decoded:
    data: np.ndarray  # [rows, *shape] in the manifest dtype (read-only view of the Parquet buffer)
    labels: np.ndarray
    masks: np.ndarray | None  # packed bits [rows, ceil(H*W/8)]
    nbytes: int


class ShardDataset:
    """A prepared dataset read through a pyarrow filesystem, with an LRU cache of decoded shards.

    Implements the reader's source protocol (`layout`, `sample_shape`, `dtype`, `num_classes`, `class_names`,
    `read(indices)`, `read_masks(indices)`, `shard_ranges`) and `__getitem__` for a torch DataLoader.
    Every shard's size and sha256 are checked when it is loaded, so corruption surfaces as a named error.
    """

    def __init__(self, root: str, *, filesystem: pafs.FileSystem | None = None, name: str | None = None,
                 cache_bytes: int = 2 << 30, check_sha256: bool = True):
        self.root = root
        self.filesystem = local_or(filesystem)
        self.name = name or root
        self.manifest = read_manifest(root, filesystem=self.filesystem, name=self.name)
        self.cache_bytes = int(cache_bytes)
        self.check_sha256 = check_sha256
        self._starts = np.array([s.first_index for s in self.manifest.shards], dtype=np.int64)
        self._cache: OrderedDict[int, _Decoded] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.shard_loads = 0  # how many times a shard was fetched and decoded (cache misses)

    # --- source protocol -------------------------------------------------------------------------------------
    layout = property(lambda self: self.manifest.layout)
    dtype = property(lambda self: self.manifest.dtype)
    sample_shape = property(lambda self: self.manifest.shape)
    num_classes = property(lambda self: self.manifest.num_classes)
    class_names = property(lambda self: list(self.manifest.class_names))

    def __len__(self) -> int:
        return self.manifest.num_samples

    @property
    def shard_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) sample ranges of the shards, for shard-local shuffling."""
        return [(s.first_index, s.first_index + s.rows) for s in self.manifest.shards]

    def describe(self) -> dict:
        return dict(self.manifest.source)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(data [B, *shape] in the manifest dtype, labels int64 [B]) for the given sample indices."""
        indices = self._check(indices)
        out = np.empty((len(indices), *self.manifest.shape), dtype=self.manifest.dtype)
        labels = np.empty(len(indices), dtype=np.int64)
        for shard_id, where, rows in self._by_shard(indices):
            shard = self._shard(shard_id)
            out[where] = shard.data[rows]
            labels[where] = shard.labels[rows]
        return out, labels

    def read_masks(self, indices) -> np.ndarray:
        """Detail masks bool [B, H, W] (synthetic datasets only)."""
        if self.manifest.mask_shape is None:
            raise DCDiTError(f"{self.name} has no detail masks (only synthetic datasets carry them)")
        indices = self._check(indices)
        h, w = self.manifest.mask_shape
        out = np.empty((len(indices), h, w), dtype=bool)
        for shard_id, where, rows in self._by_shard(indices):
            packed = self._shard(shard_id).masks[rows]
            out[where] = np.unpackbits(packed, axis=1, count=h * w).reshape(-1, h, w).astype(bool)
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(sample as the reader returns it, label) for a torch DataLoader."""
        from dcdit.data.reader import to_model_input

        data, labels = self.read([index % len(self) if -len(self) <= index < len(self) else index])
        return to_model_input(data, self.layout)[0], int(labels[0])

    # --- integrity ---------------------------------------------------------------------------------------------
    def verify(self) -> list[ShardInfo]:
        """Fetch every shard, check size, sha256, rows and indices; DCDiTError naming the first bad file."""
        for shard_id in range(len(self.manifest.shards)):
            self._load(shard_id, check_sha256=True)
        return list(self.manifest.shards)

    # --- internals ---------------------------------------------------------------------------------------------
    def _check(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}) in {self.name}")
        return indices

    def _by_shard(self, indices: np.ndarray):
        shard_ids = np.searchsorted(self._starts, indices, side="right") - 1
        for shard_id in np.unique(shard_ids):
            where = np.flatnonzero(shard_ids == shard_id)
            yield int(shard_id), where, indices[where] - self._starts[shard_id]

    def _shard(self, shard_id: int) -> _Decoded:
        with self._lock:
            hit = self._cache.get(shard_id)
            if hit is not None:
                self._cache.move_to_end(shard_id)
                return hit
            decoded = self._load(shard_id, check_sha256=self.check_sha256)
            self.shard_loads += 1
            self._cache[shard_id] = decoded
            self._cached_bytes += decoded.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes
            return decoded

    def _load(self, shard_id: int, *, check_sha256: bool) -> _Decoded:
        info = self.manifest.shards[shard_id]
        path = join(self.root, info.file)
        where = f"shard {info.file} of {self.name}"
        try:
            with self.filesystem.open_input_stream(path) as f:
                payload = f.read()
        except FileNotFoundError:
            raise DCDiTError(f"{where} is missing (listed in {MANIFEST_NAME}); restore it or re-run "
                             "`dcdit prepare-data` into a fresh destination") from None
        except OSError as err:
            raise DCDiTError(f"cannot read {where}: {one_line(err)}") from None
        if len(payload) != info.bytes:
            raise DCDiTError(f"{where} is truncated or altered: {len(payload)} bytes, manifest says {info.bytes}; "
                             "re-run `dcdit prepare-data` into a fresh destination")
        if check_sha256 and hashlib.sha256(payload).hexdigest() != info.sha256:
            raise DCDiTError(f"{where} is corrupt: sha256 does not match {MANIFEST_NAME}; "
                             "re-run `dcdit prepare-data` into a fresh destination")
        try:
            return self._decode(pq.read_table(pa.BufferReader(payload)), info)
        except (pa.ArrowException, ValueError, KeyError) as err:
            raise DCDiTError(f"{where} is unreadable ({one_line(err)}); re-run `dcdit prepare-data`") from None

    def _decode(self, table: pa.Table, info: ShardInfo) -> _Decoded:
        m = self.manifest
        if table.num_rows != info.rows:
            raise ValueError(f"{table.num_rows} rows, manifest says {info.rows}")
        index = table.column("index").to_numpy()
        if not np.array_equal(index, np.arange(info.first_index, info.first_index + info.rows)):
            raise ValueError("index column does not match the manifest")
        data = _fixed_binary_to_numpy(table.column("data"), m.sample_bytes)
        data = data.view(m.dtype).reshape(info.rows, *m.shape)
        labels = table.column("label").to_numpy().astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= m.num_classes):
            raise ValueError(f"labels outside [0, {m.num_classes})")
        masks = None
        if m.mask_shape is not None:
            masks = _fixed_binary_to_numpy(table.column("mask"), (m.mask_shape[0] * m.mask_shape[1] + 7) // 8)
            masks = masks.reshape(info.rows, -1)
        nbytes = data.nbytes + labels.nbytes + (masks.nbytes if masks is not None else 0)
        return _Decoded(data=data, labels=labels, masks=masks, nbytes=nbytes)


def _fixed_binary_to_numpy(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """FixedSizeBinary column -> uint8 [rows, width] without a per-row Python loop."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.type.byte_width != width:
        raise ValueError(f"column width {array.type.byte_width} != {width}")
    if array.null_count:
        raise ValueError("null values")
    flat = np.frombuffer(array.buffers()[1], dtype=np.uint8, count=len(array) * width, offset=array.offset * width)
    return flat.reshape(len(array), width)


def open_dataset(root: str, *, filesystem: pafs.FileSystem | None = None, name: str | None = None,
                 **kwargs) -> ShardDataset:
    """Open a prepared dataset (local path, or a path inside `filesystem`)."""
    return ShardDataset(root, filesystem=filesystem, name=name, **kwargs)
