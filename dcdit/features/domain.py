"""The domain classifier of the synthetic dataset: a small CNN whose penultimate activations are the feature space of
FD (and its logits of class accuracy), trained deterministically once per dataset and cached; meaningful offline,
where the Inception weights may be missing. Also registered with torch-fidelity under its extractor name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from dcdit.data.synthetic import render
from dcdit.errors import DCDiTError, shown
from dcdit.features.extractor import DOMAIN_EXTRACTOR, FEATURES_VERSION, Extractor, file_sha256
from dcdit.safeload import shape_mismatch

_CONFIG_KEYS = {"num_classes", "image_size", "width", "feature_dim"}
METADATA_KEY = "dcdit"  # the safetensors metadata key holding {format, config, meta}


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU(),
                         nn.AvgPool2d(2))


class DomainClassifier(nn.Module):
    """A small CNN classifier of the synthetic dataset; its penultimate activations are the FD feature space."""

    def __init__(self, *, num_classes: int, image_size: int, width: int = 16, feature_dim: int = 128,
                 meta: dict | None = None):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        self.width, self.feature_dim = width, feature_dim
        self.meta = dict(meta or {})
        stages = max(1, min(3, int(math.log2(image_size)) - 1))
        widths = [3] + [width * 2**i for i in range(stages)]
        self.body = nn.Sequential(*(_stage(a, b) for a, b in zip(widths, widths[1:])))
        self.embed = nn.Sequential(nn.Linear(widths[-1], feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (or [-1, 1] float) NCHW images -> (features (B, feature_dim), logits (B, num_classes))."""
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        features = self.embed(self.body(x).mean(dim=(2, 3)))
        return features, self.head(features)

    def config(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "image_size": self.image_size, "width": self.width,
                "feature_dim": self.feature_dim}

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file; the architecture and training record travel in its metadata.

        The metadata is ONE key holding sorted JSON: safetensors writes several keys in a per-process random order,
        so the same weights would give other file bytes, another sha256 and another protocol id on every retrain."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        record = {"format": DOMAIN_EXTRACTOR, "config": self.config(), "meta": self.meta}
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(record, sort_keys=True)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DomainClassifier:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(path))
        except FileNotFoundError:
            raise DCDiTError(f"domain classifier weights not found at {path}") from None
        except Exception as err:  # safetensors' own error type for non-safetensors files
            raise DCDiTError(f"{path} is not a saved domain classifier ({' '.join(str(err).split())[:120]})") \
                from None
        try:
            if METADATA_KEY in metadata:
                record = json.loads(metadata[METADATA_KEY])
            else:  # files written before the metadata became one key
                record = {k: json.loads(v) if k != "format" else v for k, v in metadata.items()}
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("format") != DOMAIN_EXTRACTOR:
            raise DCDiTError(f"{path} is not a saved {DOMAIN_EXTRACTOR} (its metadata does not say so)")
        config = record.get("config")
        # The architecture is built from the file's metadata: only a domain classifier's sizes, bounded.
        if not isinstance(config, dict) or set(config) != _CONFIG_KEYS or not all(
                type(v) is int and 1 <= v <= 4096 for v in config.values()):
            raise DCDiTError(f"{path}: its recorded architecture {shown(config)} is not a domain classifier's")
        model = cls(**config, meta=record.get("meta") if isinstance(record.get("meta"), dict) else {})
        problem = shape_mismatch(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
        if problem:
            raise DCDiTError(f"{path} does not hold the weights its metadata describes: {problem}")
        model.load_state_dict(state)
        model.meta["weights_sha256"] = file_sha256(path)
        return model.eval().requires_grad_(False)

    def extractor(self, *, device: str | torch.device = "cpu", batch_size: int = 256) -> Extractor:
        net = self.to(device).eval().requires_grad_(False)

        def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            features, logits = net(batch)
            return {"pool": features, "logits": logits}

        identity = {"extractor": DOMAIN_EXTRACTOR,
                    "weights_sha256": self.meta.get("weights_sha256") or _state_sha256(self),
                    "layers": ["features", "logits"], "resize": f"bilinear-antialias {self.image_size}x"
                    f"{self.image_size} when sizes differ", "input": "uint8 RGB"}
        return Extractor(DOMAIN_EXTRACTOR, net, run, identity,
                         {"pool": self.feature_dim, "logits": self.num_classes}, device=device, batch_size=batch_size)


def _state_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


DEFAULT_RECIPE = {"steps": 300, "batch_size": 64, "lr": 2e-3, "width": 16, "feature_dim": 128, "seed": 0,
                  "train_samples": 20_000, "heldout_samples": 1000}


def domain_classifier_key(dataset: dict[str, Any], recipe: dict[str, Any] | None = None) -> str:
    """Cache key of the classifier for a synthetic dataset (its `describe()`: seed, image size, classes)."""
    body = {"dataset": {k: dataset.get(k) for k in ("kind", "seed", "image_size", "num_classes")},
            "recipe": {**DEFAULT_RECIPE, **(recipe or {})}, "features_version": FEATURES_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def train_domain_classifier(*, seed: int, image_size: int, num_classes: int, recipe: dict[str, Any] | None = None,
                            progress: Callable[[int, float], None] | None = None) -> DomainClassifier:
    """Train the classifier on the synthetic dataset (seed, image_size, num_classes); deterministic for a recipe.

    Trains on samples [0, train_samples) and reports accuracy on the next `heldout_samples` (the synthetic dataset
    renders any index, so held-out samples never overlap training ones) in `.meta['heldout_accuracy']`.
    """
    r = {**DEFAULT_RECIPE, **(recipe or {})}
    unknown = set(r) - set(DEFAULT_RECIPE)
    if unknown:
        raise DCDiTError(f"unknown domain classifier recipe key {sorted(unknown)[0]!r}")
    dataset = {"kind": "synthetic", "seed": seed, "image_size": image_size, "num_classes": num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])
        model = DomainClassifier(num_classes=num_classes, image_size=image_size, width=r["width"],
                                 feature_dim=r["feature_dim"])
    optimizer = torch.optim.Adam(model.parameters(), lr=r["lr"])
    order = np.random.default_rng(r["seed"]).integers(0, r["train_samples"], size=(r["steps"], r["batch_size"]))
    model.train()
    for step, indices in enumerate(order):
        batch = render(indices, seed=seed, image_size=image_size, num_classes=num_classes)
        images = torch.from_numpy(batch.images).permute(0, 3, 1, 2)
        _, logits = model(images)
        loss = F.cross_entropy(logits, torch.from_numpy(batch.labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, float(loss))
    model.eval().requires_grad_(False)
    held = render(np.arange(r["train_samples"], r["train_samples"] + r["heldout_samples"]), seed=seed,
                  image_size=image_size, num_classes=num_classes)
    with torch.no_grad():
        _, logits = model(torch.from_numpy(held.images).permute(0, 3, 1, 2))
    accuracy = float((logits.argmax(1).numpy() == held.labels).mean())
    model.meta = {"dataset": dataset, "recipe": r, "heldout_accuracy": accuracy,
                  "key": domain_classifier_key(dataset, r)}
    return model


def _register_with_torch_fidelity() -> None:
    """Make the domain classifier usable as `calculate_metrics(feature_extractor='dcdit-synthetic-classifier',
    feature_extractor_weights_path=FILE)`."""
    if DOMAIN_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class FeatureExtractorDomain(FeatureExtractorBase):
        """torch-fidelity wrapper of DomainClassifier: features 'features' (FD, KID, PR) and 'logits' (IS)."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise DCDiTError(f"{DOMAIN_EXTRACTOR} needs feature_extractor_weights_path")
            self.net = DomainClassifier.load(feature_extractor_weights_path)

        def forward(self, x):
            features, logits = self.net(x)
            out = {"features": features, "logits": logits}
            return tuple(out[name] for name in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    register_feature_extractor(DOMAIN_EXTRACTOR, FeatureExtractorDomain)


_register_with_torch_fidelity()



_register_with_torch_fidelity()

__all__ = ["DomainClassifier", "DEFAULT_RECIPE", "domain_classifier_key", "train_domain_classifier"]
