"""Feature extractors for the evaluator: the spec an actor builds the driver's extractor from (weights checked on the
driver, shipped through the object store to machines that lack the file), and the synthetic domain classifier,
trained once per synthetic dataset and cached in storage.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dcdit.errors import DCDiTError
from dcdit.features import (DOMAIN_EXTRACTOR, INCEPTION, INCEPTION_DIMS, build_extractor, domain_classifier_key,
                            file_sha256, inception_identity, resolve_inception_weights, train_domain_classifier,
                            validate_inception_weights)

CACHE_DIR = "_cache"  # {storage}/_cache/fid-references/{key}.npz, {storage}/_cache/extractors/{key}.safetensors


@dataclass(frozen=True)
class ExtractorSpec:
    """What an actor needs to build the same extractor as the driver."""

    name: str
    weights_path: str | None  # on the driver's machine
    weights_sha256: str | None
    blob: Any = None  # ObjectRef of the weights file's bytes (actors on other machines)
    identity: dict = field(default_factory=dict)
    dims: dict = field(default_factory=dict)

    def resolved(self, fetch: Callable[[Any], bytes]) -> ExtractorSpec:
        """This spec with weights on this machine: the driver's file when it is here unchanged, else a local copy of
        the bytes the driver put in the object store (`blob`, fetched with `fetch`: ray.get in an actor)."""
        path = self.weights_path
        if path is None or (os.path.isfile(path) and file_sha256(path) == self.weights_sha256):
            return self
        local = Path(tempfile.gettempdir()) / f"dcdit-weights-{self.weights_sha256[:16]}{Path(path).suffix}"
        if not (local.is_file() and file_sha256(local) == self.weights_sha256):
            _write_atomically(local, fetch(self.blob))
        return replace(self, weights_path=str(local))

    def build(self, device: torch.device, *, spatial: bool = True):
        return build_extractor(self.name, self.weights_path, spatial=spatial, device=device)


def prepare_extractor(name: str, weights: str | None, *, storage=None, domain_source: dict | None = None,
                      echo: Callable[[str], None] | None = None, build: bool = False) -> tuple[ExtractorSpec, Any]:
    """Resolve and check the weights on the driver, so errors come before Ray starts. Returns the spec actors build
    from and, with `build`, a driver-side extractor (for Inception the spec needs no model: None otherwise)."""
    if name == DOMAIN_EXTRACTOR and weights is None:
        weights = domain_classifier_path(storage, domain_source, echo=echo)
    elif name == INCEPTION:
        weights = str(resolve_inception_weights(weights))
    elif weights is not None and not os.path.isfile(weights):
        raise DCDiTError(f"weights file {weights} not found")
    extractor = None
    if name == INCEPTION and not build:
        validate_inception_weights(weights)
        identity, dims = inception_identity(weights), dict(INCEPTION_DIMS)
    else:
        extractor = build_extractor(name, weights, spatial=name == INCEPTION)
        identity, dims = extractor.identity, extractor.dims
    sha = file_sha256(weights) if weights is not None else None
    spec = ExtractorSpec(name=name, weights_path=str(weights) if weights else None, weights_sha256=sha,
                         identity=identity, dims=dims)
    return spec, extractor


def domain_classifier_path(storage, source: dict | None, *, echo=None) -> str:
    """The cached domain classifier for a synthetic dataset, trained once and kept in storage (local copy path)."""
    if not source or source.get("kind") != "synthetic":
        raise DCDiTError(f"the {DOMAIN_EXTRACTOR} extractor is trained on the synthetic dataset; this evaluation's "
                         "data is not synthetic: use --extractor inception-v3-compat, or pass --weights")
    key = domain_classifier_key(source)
    rel = f"{CACHE_DIR}/extractors/{DOMAIN_EXTRACTOR}-{key}.safetensors"
    local = Path(tempfile.gettempdir()) / f"dcdit-{DOMAIN_EXTRACTOR}-{key}.safetensors"
    if storage is not None and storage.exists(rel):
        if not local.is_file() or local.stat().st_size != storage.size(rel):
            _write_atomically(local, storage.read_bytes(rel))
        return str(local)
    if echo:
        echo(f"training the {DOMAIN_EXTRACTOR} for synthetic data (seed {source['seed']}, "
             f"{source['image_size']}px, {source['num_classes']} classes); cached afterwards")
    model = train_domain_classifier(seed=source["seed"], image_size=source["image_size"],
                                    num_classes=source["num_classes"])
    model.save(local)
    if storage is not None:
        storage.write_bytes(rel, local.read_bytes())
    return str(local)


def _write_atomically(path: Path, data: bytes) -> None:
    """Other processes on this machine may read `path` at the same time: they see the old file or the new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
