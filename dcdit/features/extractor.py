"""The extractor interface: uint8 NCHW RGB images in, float32 features out ('pool' for FID/FD, KID and
precision/recall; 'logits' for IS and class accuracy; 'spatial' for sFID), with an `identity` naming everything
that changes the features (extractor, weights sha256, resizing) so that caches keyed by it are never stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dcdit.errors import DCDiTError

INCEPTION = "inception-v3-compat"
DOMAIN_EXTRACTOR = "dcdit-synthetic-classifier"
FEATURES_VERSION = 1  # bump when anything here changes features; it is part of every cache key


class Extractor:
    """uint8 NCHW RGB images -> {'pool': (B, D), 'logits': (B, C), 'spatial': (B, S)} float32 CPU tensors."""

    name: str
    identity: dict[str, Any]  # everything that determines the features; part of every cache key
    dims: dict[str, int]
    is_inception: bool = False

    def __init__(self, name: str, module: nn.Module, run: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                 identity: dict[str, Any], dims: dict[str, int], *, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        self.name, self.module, self._run = name, module, run
        self.identity = {"features_version": FEATURES_VERSION, **identity}
        self.dims = dims
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.is_inception = name == INCEPTION

    @property
    def distance_name(self) -> str:
        """'FID' for Inception features, 'FD' for any other extractor (never call those FID)."""
        return "FID" if self.is_inception else "FD"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        images = as_uint8_nchw(images)
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start:start + self.batch_size].to(self.device)
            for k, v in self._run(batch).items():
                parts.setdefault(k, []).append(v.detach().float().cpu())
        if not parts:
            return {k: torch.zeros(0, d) for k, d in self.dims.items()}
        return {k: torch.cat(v) for k, v in parts.items()}


def as_uint8_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (B, 3, H, W) from uint8 NCHW or NHWC (numpy or torch); refuses float images (quantise first)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8:
        raise DCDiTError(f"feature extraction takes uint8 images, got {images.dtype}; quantise samples first")
    if images.ndim != 4:
        raise DCDiTError(f"expected a batch of images (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise DCDiTError(f"expected RGB images with 3 channels, got shape {tuple(images.shape)}")
    return images.contiguous()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so repeated evaluations hash a weights file once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


@contextlib.contextmanager
def checked_weights_copy(state: dict[str, torch.Tensor]) -> Iterator[str]:
    """A private temporary file holding `state` (tensors only, already checked), for torch-fidelity extractors
    that take a path and unpickle it with weights_only=False: they never open a file from outside."""
    fd, path = tempfile.mkstemp(prefix="dcdit-weights-", suffix=".pth")
    os.close(fd)
    try:
        torch.save(state, path)
        yield path
    finally:
        os.unlink(path)


__all__ = ["INCEPTION", "DOMAIN_EXTRACTOR", "FEATURES_VERSION", "Extractor", "as_uint8_nchw", "file_sha256",
           "checked_weights_copy"]
