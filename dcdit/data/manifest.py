"""The manifest of a prepared dataset (MANIFEST.json, written last): sample count, shape, dtype, layout, classes and
the size and sha256 of every shard file. Reading one checks everything a reader relies on: fields, counts, sizes
within bounds, and shard file names that stay inside the dataset folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.fs as pafs

from dcdit.errors import DCDiTError

MANIFEST_NAME = "MANIFEST.json"
FORMAT_NAME = "dcdit-shards"
FORMAT_VERSION = 1
# layout -> (axes, dtype). Pixels are what the reader maps to [-1, 1]; latents are already scaled by the VAE factor.
LAYOUTS = {"pixels": ("HWC", "uint8"), "latents": ("CHW", "float16")}
SHARD_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # no separators, no '..': files stay in the dataset
MAX_SAMPLE_VALUES = 1 << 26  # values in one sample (a 4096 x 4096 RGB image is 50M)
MAX_CLASSES = 1_000_000


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.parquet"


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if root else name


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: samples [first_index, first_index + rows) of the dataset."""

    file: str
    rows: int
    first_index: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a dataset; serialised as MANIFEST.json."""

    layout: str
    shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    source: dict = field(default_factory=dict)  # how it was made: kind, path, seed, image size, VAE, ...
    mask_shape: tuple[int, int] | None = None  # synthetic datasets carry detail masks (in pixel space)

    @property
    def num_samples(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def axes(self) -> str:
        return LAYOUTS[self.layout][0]

    @property
    def dtype(self) -> str:
        return LAYOUTS[self.layout][1]

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "num_samples": self.num_samples,
            "layout": self.layout, "axes": self.axes, "shape": list(self.shape), "dtype": self.dtype,
            "num_classes": self.num_classes, "class_names": list(self.class_names),
            "mask_shape": list(self.mask_shape) if self.mask_shape else None, "source": self.source,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "MANIFEST.json") -> Manifest:
        def bad(problem: str) -> DCDiTError:
            return DCDiTError(f"{where} is not a valid dataset manifest: {problem}; re-run `dcdit prepare-data`")

        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise bad(f"'format' is not '{FORMAT_NAME}'")
        if data.get("version") != FORMAT_VERSION:
            raise bad(f"version {data.get('version')!r} is not {FORMAT_VERSION}")
        try:
            layout = data["layout"]
            if layout not in LAYOUTS:
                raise bad(f"unknown layout {layout!r} (expected one of {sorted(LAYOUTS)})")
            if data.get("dtype") != LAYOUTS[layout][1]:
                raise bad(f"dtype {data.get('dtype')!r} does not match layout {layout!r}")
            shape = tuple(int(v) for v in data["shape"])
            if len(shape) != 3 or min(shape) < 1 or math.prod(shape) > MAX_SAMPLE_VALUES:
                raise bad(f"shape {list(shape)} is not three positive sizes of at most {MAX_SAMPLE_VALUES} values")
            shards = tuple(ShardInfo(file=_shard_file(s["file"], bad), rows=int(s["rows"]),
                                     first_index=int(s["first_index"]), sha256=str(s["sha256"]),
                                     bytes=int(s["bytes"])) for s in data["shards"])
            mask_shape = tuple(int(v) for v in data["mask_shape"]) if data.get("mask_shape") else None
            if not 1 <= int(data["num_classes"]) <= MAX_CLASSES:
                raise bad(f"num_classes {data['num_classes']} is not in [1, {MAX_CLASSES}]")
            if mask_shape is not None and (len(mask_shape) != 2 or not 1 <= min(mask_shape)
                                           or math.prod(mask_shape) > MAX_SAMPLE_VALUES):
                raise bad(f"mask_shape {list(mask_shape)} is not two positive sizes")
            manifest = cls(layout=layout, shape=shape, num_classes=int(data["num_classes"]),
                           class_names=tuple(str(c) for c in data["class_names"]), shards=shards,
                           source=dict(data.get("source") or {}), mask_shape=mask_shape)
        except (KeyError, TypeError, ValueError) as err:
            raise bad(f"missing or malformed field ({type(err).__name__}: {err})") from None
        expected = 0
        for s in shards:
            if s.bytes < 1 or len(s.sha256) != 64:
                raise bad(f"shard {s.file} lists {s.bytes} bytes and sha256 {s.sha256[:70]!r}")
            if s.first_index != expected or s.rows < 1:
                raise bad(f"shard {s.file} starts at sample {s.first_index}, expected {expected}")
            expected += s.rows
        if expected != data.get("num_samples"):
            raise bad(f"num_samples {data.get('num_samples')} != {expected} rows in the shards")
        if len(manifest.class_names) != manifest.num_classes:
            raise bad(f"{len(manifest.class_names)} class names for {manifest.num_classes} classes")
        return manifest


def _shard_file(name, bad) -> str:
    """A shard's file name: a plain name inside the dataset folder, never a path that leaves it."""
    name = str(name)
    if not SHARD_FILE.fullmatch(name):
        raise bad(f"shard file {name[:200]!r} is not a plain file name inside the dataset folder")
    return name


def local_or(filesystem: pafs.FileSystem | None) -> pafs.FileSystem:
    return filesystem if filesystem is not None else pafs.LocalFileSystem()


def read_manifest(root: str, *, filesystem: pafs.FileSystem | None = None, name: str | None = None) -> Manifest:
    """The dataset's manifest, or a DCDiTError saying why `root` is not a dataset."""
    fs = local_or(filesystem)
    where = name or root
    try:
        with fs.open_input_stream(join(root, MANIFEST_NAME)) as f:
            raw = f.read()
    except FileNotFoundError:
        raise DCDiTError(f"{where} is not a dataset: no {MANIFEST_NAME} (preparation unfinished or wrong path); "
                         "run `dcdit prepare-data` to create or finish it") from None
    except OSError as err:
        raise DCDiTError(f"cannot read {MANIFEST_NAME} from {where}: {one_line(err)}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise DCDiTError(f"{where}/{MANIFEST_NAME} is not valid JSON; re-run `dcdit prepare-data`") from None
    return Manifest.from_dict(data, where=f"{where}/{MANIFEST_NAME}")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__


__all__ = ["MANIFEST_NAME", "FORMAT_NAME", "FORMAT_VERSION", "LAYOUTS", "MAX_SAMPLE_VALUES", "MAX_CLASSES",
           "ShardInfo", "Manifest", "shard_name", "join", "local_or", "one_line", "read_manifest"]
