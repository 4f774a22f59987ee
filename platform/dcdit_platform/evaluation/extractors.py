"""Feature extractors for the evaluator: which one an evaluation uses when none is named, the spec an actor builds
the driver's extractor from (weights checked on the driver, shipped through the object store to machines that lack
the file), and the synthetic domain classifier, trained once per synthetic dataset and machine and cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dcdit.errors import DCDiTError
from dcdit.features import (DOMAIN_EXTRACTOR, INCEPTION, INCEPTION_DIMS, INCEPTION_WEIGHTS_FILE,
                            INCEPTION_WEIGHTS_URL, build_extractor, domain_classifier_key, file_sha256,
                            inception_cache_path, inception_identity, resolve_inception_weights,
                            train_domain_classifier, validate_inception_weights)

CACHE_DIR = "_cache"  # {storage}/_cache/fid-references/{key}.npz, {storage}/_cache/extractors/{key}.safetensors
# The synthetic data a domain classifier is trained on when nothing names one (`dcdit fid` on two folders): the
# dataset every shipped config trains on (experiments/quickstart, experiments/smoke.yaml).
DEFAULT_SYNTHETIC = {"kind": "synthetic", "seed": 0, "image_size": 16, "num_classes": 10}


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dcdit (default ~/.cache/dcdit): domain classifiers (trained once per machine, for every
    command) and copies of the weights an actor's machine lacks. Nothing goes to the system's temporary folder."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dcdit"


def choose_extractor(name: str | None, weights: str | None, domain_source: dict | None) -> tuple[str, str | None]:
    """(extractor, the line that says why) of an evaluation that may not name one: the synthetic domain classifier
    for synthetic data (offline, no download), else Inception; --weights alone means Inception weights."""
    if name:
        return name, None
    if weights is not None or not (domain_source and domain_source.get("kind") == "synthetic"):
        return INCEPTION, None
    return DOMAIN_EXTRACTOR, (f"synthetic data: FD in the features of the {DOMAIN_EXTRACTOR} (trained on that "
                              "data, no download); --extractor inception-v3-compat gives FID")


def fid_default_extractor(weights: str | None) -> tuple[str, str | None]:
    """`dcdit fid` without --extractor: (extractor, the line that says why). Inception when --weights is given or its
    weights are in the torch hub cache; offline without them, the domain classifier of the default synthetic data
    (DEFAULT_SYNTHETIC), whose FD means something for images like that data."""
    if weights is not None or inception_cache_path().is_file():
        return INCEPTION, None
    return DOMAIN_EXTRACTOR, (
        f"no Inception weights in {inception_cache_path().parent}: FD in the features of the {DOMAIN_EXTRACTOR} "
        f"(synthetic data, {DEFAULT_SYNTHETIC['image_size']} px), not FID; for FID download "
        f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL} there, or pass --weights")


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
        local = user_cache_dir() / "weights" / f"{self.weights_sha256[:16]}{Path(path).suffix}"
        if not (local.is_file() and file_sha256(local) == self.weights_sha256):
            _write_atomically(local, fetch(self.blob))
        return replace(self, weights_path=str(local))

    def build(self, device: torch.device, *, spatial: bool = True):
        return build_extractor(self.name, self.weights_path, spatial=spatial, device=device)


def prepare_extractor(name: str | None, weights: str | None, *, storage=None, domain_source: dict | None = None,
                      echo: Callable[[str], None] | None = None, build: bool = False) -> tuple[ExtractorSpec, Any]:
    """Resolve and check the weights on the driver, so errors come before Ray starts. Returns the spec actors build
    from and, with `build`, a driver-side extractor (for Inception the spec needs no model: None otherwise). A
    `name` of None is chosen by `choose_extractor`, and the choice is said on `echo`."""
    name, why = choose_extractor(name, weights, domain_source)
    if why and echo:
        echo(why)
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
    """The domain classifier for a synthetic dataset, trained once per machine: the local copy in
    user_cache_dir()/extractors/ (fetched from {storage}/_cache/extractors/ when another machine trained it), also
    kept in the storage so that its evaluations stay reproducible elsewhere."""
    if not source or source.get("kind") != "synthetic":
        raise DCDiTError(f"the {DOMAIN_EXTRACTOR} extractor is trained on the synthetic dataset; this evaluation's "
                         "data is not synthetic: use --extractor inception-v3-compat, or pass --weights")
    name = f"{DOMAIN_EXTRACTOR}-{domain_classifier_key(source)}.safetensors"
    rel = f"{CACHE_DIR}/extractors/{name}"
    local = user_cache_dir() / "extractors" / name
    if not local.is_file() and storage is not None and storage.exists(rel):
        _write_atomically(local, storage.read_bytes(rel))
    elif not local.is_file():
        if echo:
            echo(f"training the {DOMAIN_EXTRACTOR} for synthetic data (seed {source['seed']}, "
                 f"{source['image_size']}px, {source['num_classes']} classes), once; cached in {local.parent}")
        model = train_domain_classifier(seed=source["seed"], image_size=source["image_size"],
                                        num_classes=source["num_classes"])
        model.save(local)  # atomic: concurrent evaluations training the same classifier write the same bytes
    if storage is not None and not storage.exists(rel):
        storage.write_bytes(rel, local.read_bytes())
    return str(local)


def _write_atomically(path: Path, data: bytes) -> None:
    """Other processes on this machine may read `path` at the same time: they see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
