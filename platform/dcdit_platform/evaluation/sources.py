"""Where images come from: the reference image sources (synthetic, prepared shards, a folder, an in-memory array)
that actors open and read by index, the listing and identity of image folders, and what a checkpoint's training
data says about its samples (classes, VAE, size) and its reference.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from dcdit.data.shards import MANIFEST_NAME, open_dataset, read_manifest
from dcdit.data.synthetic import render
from dcdit.data.vae import center_crop_arr
from dcdit.errors import DCDiTError
from dcdit_platform.config.sections import DEFAULT_IMAGE_SIZE
from dcdit_platform.storage import open_storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

Reader = Callable[[np.ndarray], np.ndarray]  # image indices -> uint8 NHWC images


# --- Reference image sources, sent to the actors ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ImageSource:
    """A readable set of reference images: what opens it in any process, and what determines its content."""

    identity: dict  # what determines its content (never a path alone): part of the statistics' cache key
    size: int
    label: str  # for people: what it is

    def reader(self) -> Reader:
        raise NotImplementedError

    def resolved(self, fetch: Callable[[Any], Any]) -> ImageSource:
        """This source with object-store references replaced by their values (`fetch` is ray.get in an actor)."""
        return self


@dataclass(frozen=True, kw_only=True)
class SyntheticImages(ImageSource):
    seed: int
    image_size: int
    num_classes: int

    def reader(self) -> Reader:
        return lambda idx: render(idx, seed=self.seed, image_size=self.image_size,
                                  num_classes=self.num_classes).images


@dataclass(frozen=True, kw_only=True)
class ShardImages(ImageSource):
    """A prepared dataset of pixels (MANIFEST.json + Parquet shards)."""

    uri: str

    def reader(self) -> Reader:
        storage = open_storage(self.uri)
        data = open_dataset(storage.root, filesystem=storage.filesystem, name=self.label)
        return lambda idx: data.read(idx)[0]


@dataclass(frozen=True, kw_only=True)
class FolderImages(ImageSource):
    uri: str
    files: tuple[str, ...]  # relative to uri, sorted
    crop: int | None  # ADM centre crop to this side, or None (images used as they are)

    def reader(self) -> Reader:
        storage = open_storage(self.uri)
        return lambda idx: read_images(storage, [self.files[i] for i in idx], crop=self.crop)


@dataclass(frozen=True, kw_only=True)
class ArrayImages(ImageSource):
    """Images held in memory (an npz's arr_0); the driver puts them in the object store once for all actors."""

    array: Any  # uint8 NHWC ndarray, or an ObjectRef of one until `resolved`

    def reader(self) -> Reader:
        array = self.array
        return lambda idx: np.ascontiguousarray(array[np.asarray(idx)])

    def resolved(self, fetch: Callable[[Any], Any]) -> ImageSource:
        return self if isinstance(self.array, np.ndarray) else replace(self, array=fetch(self.array))


def synthetic_source(params: dict) -> SyntheticImages:
    p = {k: int(params[k]) for k in ("seed", "image_size", "num_classes", "num_samples")}
    return SyntheticImages(identity={"kind": "synthetic", **p}, size=p["num_samples"],
                           label=f"synthetic(seed={p['seed']}, {p['image_size']}px, {p['num_classes']} classes, "
                                 f"{p['num_samples']} samples)",
                           seed=p["seed"], image_size=p["image_size"], num_classes=p["num_classes"])


def dataset_source(uri: str, *, crop: int | None) -> ImageSource:
    """A prepared dataset (MANIFEST.json + Parquet shards) or an image folder, as reference images."""
    storage = open_storage(uri)
    if not storage.is_local:
        storage.check()
    if storage.exists(MANIFEST_NAME):
        manifest = read_manifest(storage.root, filesystem=storage.filesystem, name=uri)
        if manifest.layout == "pixels":
            raw = storage.read_bytes(MANIFEST_NAME)
            identity = {"kind": "shards", "manifest_sha256": hashlib.sha256(raw).hexdigest()}
            return ShardImages(identity=identity, size=manifest.num_samples, label=uri, uri=storage.uri)
        # Latents are not images: compare with the images they were encoded from.
        src = manifest.source
        if src.get("kind") == "synthetic":
            return synthetic_source({**src, "num_samples": src.get("num_samples", manifest.num_samples)})
        if src.get("kind") == "folder" and src.get("path"):
            return dataset_source(src["path"], crop=int(src.get("image_size") or crop or 0) or None)
        raise DCDiTError(f"{uri} holds VAE latents and does not record its source images; pass the image folder "
                         "or an ADM reference batch with --reference")
    if not storage.isdir():
        raise DCDiTError(f"reference {uri} is not an npz file, a prepared dataset or an image folder")
    files = list_images(storage)
    if not files:
        raise DCDiTError(f"reference folder {uri} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    identity = {"kind": "folder", "files": folder_identity(storage, files), "count": len(files),
                "crop": f"adm_center_crop {crop}" if crop else None}
    return FolderImages(identity=identity, size=len(files), label=uri, uri=storage.uri, files=tuple(files),
                        crop=crop)


def parse_synthetic(text: str) -> dict:
    """'synthetic:seed=0,image_size=16,num_classes=10,num_samples=10000' -> params (these are the defaults)."""
    params = {"kind": "synthetic", "seed": 0, "image_size": DEFAULT_IMAGE_SIZE, "num_classes": 10,
              "num_samples": 10_000}
    body = text.split(":", 1)[1] if ":" in text else ""
    for part in filter(None, body.split(",")):
        key, _, value = part.partition("=")
        if key not in params or key == "kind":
            raise DCDiTError(f"unknown synthetic reference option {key!r} in {text!r} "
                             "(seed, image_size, num_classes, num_samples)")
        try:
            params[key] = int(value)
        except ValueError:
            raise DCDiTError(f"synthetic reference option {key}={value!r} must be an integer") from None
    return params


# --- Image files ---------------------------------------------------------------------------------------------------

def decode_image(data: bytes, where: str) -> Image.Image:
    """A decoded image file; one PIL cannot decode (text named .png, a truncated file, a decompression bomb past
    PIL's pixel limit) is a one-line error naming the file."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        detail = " ".join(str(err).split())[:120] or type(err).__name__
        raise DCDiTError(f"{where} is not a readable image ({detail}); remove or replace it") from None
    return image


def read_images(storage, files: Sequence[str], *, crop: int | None = None) -> np.ndarray:
    """uint8 NHWC images from files relative to `storage` (RGB; ADM centre crop to `crop` when given)."""
    out = []
    for rel in files:
        with storage.open_input(rel) as f:
            image = decode_image(f.read(), storage.join(rel))
        out.append(center_crop_arr(image, crop) if crop else np.asarray(image.convert("RGB")))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise DCDiTError(f"images of different sizes {sorted(shapes)[:3]} in one batch; resize them, or use a "
                         "dataset reference (which centre-crops to the samples' resolution)")
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def list_images(storage) -> list[str]:
    """Image files below `storage`'s root (recursive), sorted."""
    found: list[str] = []

    def walk(rel: str) -> None:
        for name in storage.listdir(rel):
            if name.startswith("."):
                continue
            path = f"{rel}/{name}" if rel else name
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(path)
            elif storage.isdir(path):
                walk(path)

    walk("")
    return sorted(found)


def folder_identity(storage, files: Sequence[str], *, content_limit: int = 2 << 30) -> str:
    """A hash of the folder's images: of their bytes when they total at most `content_limit` (2 GiB), else of
    (path, size, mtime) per file. Any added, removed or rewritten image changes it."""
    infos = [storage.info(rel) for rel in files]
    digest = hashlib.sha256()
    if sum(int(i.size or 0) for i in infos) <= content_limit:
        digest.update(b"content\n")
        for rel in files:
            digest.update(f"{rel}\t{storage.sha256(rel)}\n".encode())
    else:
        digest.update(b"stat\n")
        for rel, info in zip(files, infos):
            mtime = getattr(info, "mtime_ns", None) or (info.mtime.timestamp() if info.mtime else "")
            digest.update(f"{rel}\t{info.size}\t{mtime}\n".encode())
    return digest.hexdigest()


# --- What a checkpoint's training data says ------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """What a checkpoint generates."""

    num_classes: int  # classes sampled (labels i mod num_classes)
    vae: str | None  # the VAE decoding its latents, None for a pixel model
    shape: tuple[int, int, int]  # the model's sample (C, H, W)
    image_size: int  # side of the decoded images in pixels


def generation_geometry(config) -> Geometry:
    """The geometry of an experiment's samples, read from its training data (pixels when that data is gone)."""
    m = config.model
    shape = (m.in_channels, m.input_size, m.input_size)
    if config.data.is_synthetic:
        return Geometry(min(config.data.num_classes, m.num_classes), None, shape, m.input_size)
    storage = open_storage(config.data.source, config.storage.options() or None)
    try:
        manifest = read_manifest(storage.root, filesystem=storage.filesystem, name=config.data.source)
    except DCDiTError:
        return Geometry(m.num_classes, None, shape, m.input_size)
    classes = min(manifest.num_classes, m.num_classes)
    if manifest.layout == "latents":
        vae = manifest.source.get("vae")
        if not vae:
            raise DCDiTError(f"the training data {config.data.source} holds latents but names no VAE to decode them")
        return Geometry(classes, vae, shape, int(manifest.source.get("image_size") or m.input_size * 8))
    return Geometry(classes, None, shape, m.input_size)


def training_reference(config) -> tuple[str, dict | None]:
    """(reference spec, synthetic params or None) of a run's own training data."""
    d = config.data
    if d.is_synthetic:
        return "synthetic", {"kind": "synthetic", "seed": config.data_seed, "image_size": d.image_size,
                             "num_classes": d.num_classes, "num_samples": d.num_samples}
    return d.source, None


def evaluation_reference(reference: str | None, config) -> tuple[str, dict | None]:
    """(reference spec, synthetic params or None) of an evaluation: --reference, else the training data."""
    if not reference:
        return training_reference(config)
    if reference == "synthetic":
        if not config.data.is_synthetic:
            raise DCDiTError("--reference synthetic needs a checkpoint trained on the synthetic data")
        return reference, training_reference(config)[1]
    return reference, None


def domain_source(config, reference: str) -> dict | None:
    """The synthetic data a domain classifier is trained on: the model's own, else a synthetic reference's."""
    own = training_reference(config)[1]
    if own is None and reference and reference.startswith("synthetic:"):
        return parse_synthetic(reference)
    return own
