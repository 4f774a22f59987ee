"""Feature extractors for sample-quality metrics: torch-fidelity's Inception (FID, IS, sFID) and a small domain
classifier for the synthetic dataset (FD and class fidelity, meaningful offline).

An `Extractor` maps uint8 NCHW RGB images to float32 features: 'pool' (FID/FD, KID, precision/recall), 'logits'
(IS, class accuracy) and, for Inception, 'spatial' (sFID). Its `identity` names everything that changes the
features (extractor, weights sha256, resizing), so caches keyed by it are never stale.
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

from dcdit.errors import DCDiTError, did_you_mean

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         f"{INCEPTION_WEIGHTS_FILE}")
DOMAIN_EXTRACTOR = "dcdit-synthetic-classifier"
# sFID: the first 7 channels of TF Inception's mixed_6/conv (Mixed_6d.branch1x1 here), 17x17x7 flattened
# channels-last as in ADM's evaluator, so its numbers compare with ADM reference batches' mu_s/sigma_s.
SPATIAL_MODULE, SPATIAL_CHANNELS = "Mixed_6d.branch1x1", 7
FEATURES_VERSION = 1  # bump when anything here changes features; it is part of every cache key


# --- weights -------------------------------------------------------------------------------------------------------

def inception_cache_path() -> Path:
    """Where torch-fidelity (torch.hub) looks for the Inception weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _missing_weights(problem: str) -> DCDiTError:
    return DCDiTError(
        f"{problem}: download {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL} on a machine with internet and "
        f"put it in {inception_cache_path().parent}/ ($TORCH_HOME/hub/checkpoints/), or pass --weights PATH")


def resolve_inception_weights(weights: str | os.PathLike | None = None, *, download: bool | None = None) -> Path:
    """A local path to the Inception weights: `weights` if given, else the torch.hub cache, else a download.

    Downloads only when `download` (default: unless DCDIT_OFFLINE=1); any failure is a DCDiTError that names the
    file, its URL and where to put it.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise _missing_weights(f"Inception weights not found at {weights}")
        return path
    cached = inception_cache_path()
    if cached.is_file():
        return cached
    if download is None:
        download = os.environ.get("DCDIT_OFFLINE", "") not in ("1", "true", "yes")
    if not download:
        raise _missing_weights(f"Inception weights are not in {cached.parent} and downloads are off (DCDIT_OFFLINE)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached), hash_prefix="6726825d", progress=False)
    except Exception as err:  # URLError, HTTPError, hash mismatch, disk full: all mean "not available"
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise _missing_weights(f"Inception weights are not in {cached.parent} and cannot be downloaded ({reason})") \
            from None
    return cached


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


def validate_inception_weights(path: str | os.PathLike) -> None:
    """Refuse files that are not a plain Inception state dict (pickled code, other models) before torch-fidelity
    loads them with weights_only=False."""
    from dcdit.checkpoint import load_weights_only

    state = load_weights_only(path)
    if not isinstance(state, dict) or f"{SPATIAL_MODULE}.conv.weight" not in state:
        raise DCDiTError(f"{path} is not an Inception-v3 (torch-fidelity) state dict; pass the file "
                         f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}")


# --- the extractor interface ---------------------------------------------------------------------------------------

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


def build_extractor(name: str = INCEPTION, weights: str | os.PathLike | None = None, *, logits: bool = True,
                    spatial: bool = True, device: str | torch.device = "cpu", batch_size: int = 64) -> Extractor:
    """The extractor `name`: 'inception-v3-compat' (default), 'dcdit-synthetic-classifier' (needs `weights`),
    or any other torch-fidelity extractor (its FID layer only)."""
    if name == INCEPTION:
        return _inception(weights, logits=logits, spatial=spatial, device=device, batch_size=batch_size)
    if name == DOMAIN_EXTRACTOR:
        if weights is None:
            raise DCDiTError(f"the {DOMAIN_EXTRACTOR} extractor needs --weights (a classifier saved by "
                             "DomainClassifier.save; `dcdit eval` trains and caches one itself)")
        return DomainClassifier.load(weights).extractor(device=device, batch_size=batch_size)
    return _torch_fidelity_extractor(name, weights, device=device, batch_size=batch_size)


def _inception(weights, *, logits: bool, spatial: bool, device, batch_size: int) -> Extractor:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = resolve_inception_weights(weights)
    validate_inception_weights(path)
    layers = ["2048", "logits_unbiased"] if logits else ["2048"]
    net = FeatureExtractorInceptionV3(INCEPTION, layers, feature_extractor_weights_path=str(path))
    net = net.to(device)
    captured: dict[str, torch.Tensor] = {}
    if spatial:
        def keep_spatial(_module, _inputs, output):
            captured["spatial"] = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)

        net.get_submodule(SPATIAL_MODULE).register_forward_hook(keep_spatial)

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(zip(("pool", "logits"), net(batch)))
        if spatial:
            out["spatial"] = captured.pop("spatial")
        return out

    dims = {k: v for k, v in INCEPTION_DIMS.items() if k == "pool" or (k == "logits" and logits)
            or (k == "spatial" and spatial)}
    return Extractor(INCEPTION, net, run, inception_identity(path), dims, device=device, batch_size=batch_size)


INCEPTION_DIMS = {"pool": 2048, "logits": 1008, "spatial": 17 * 17 * SPATIAL_CHANNELS}


def inception_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What determines Inception features (not which of them an extractor computes): weights and resizing."""
    return {"features_version": FEATURES_VERSION, "extractor": INCEPTION, "weights_sha256": file_sha256(path),
            "layers": {"pool": "2048", "logits": "logits_unbiased",
                       "spatial": f"{SPATIAL_MODULE}[:{SPATIAL_CHANNELS}] NHWC"},
            "resize": "tf1-bilinear 299x299 (torch-fidelity)", "input": "uint8 RGB"}


def _torch_fidelity_extractor(name: str, weights, *, device, batch_size: int) -> Extractor:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        known = [INCEPTION, DOMAIN_EXTRACTOR, *sorted(set(FEATURE_EXTRACTORS_REGISTRY) - {INCEPTION})]
        raise DCDiTError(f"unknown feature extractor {name!r}{did_you_mean(name, known)}; "
                         f"choose one of {', '.join(known)}")
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layer = cls.get_default_feature_layer_for_metric("fid")
    kwargs = {"feature_extractor_weights_path": str(weights)} if weights is not None else {}
    try:
        net = cls(name, [layer], verbose=False, **kwargs).to(device).eval()
    except NotImplementedError as err:
        raise DCDiTError(f"extractor {name} cannot be used here: {err}") from None
    except OSError as err:  # a download that failed offline
        raise DCDiTError(f"cannot load the weights of extractor {name} ({' '.join(str(err).split())[:160]}); "
                         "pass --weights PATH to a local copy") from None
    weights_id = file_sha256(weights) if weights is not None else f"torch-fidelity default for {name}"

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": net(batch)[0]}

    dim = int(run(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device))["pool"].shape[1])
    identity = {"extractor": name, "weights_sha256": weights_id, "layers": [layer],
                "resize": f"torch-fidelity {name} default", "input": "uint8 RGB"}
    return Extractor(name, net, run, identity, {"pool": dim}, device=device, batch_size=batch_size)


# --- the domain classifier ------------------------------------------------------------------------------------------

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
        """One safetensors file; the architecture and training record travel in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": DOMAIN_EXTRACTOR, "config": json.dumps(self.config()),
                                             "meta": json.dumps(self.meta, sort_keys=True)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DomainClassifier:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(path))
        except FileNotFoundError:
            raise DCDiTError(f"domain classifier weights not found at {path}") from None
        except Exception as err:  # safetensors' own error type for non-safetensors files
            raise DCDiTError(f"{path} is not a saved domain classifier ({' '.join(str(err).split())[:120]})") \
                from None
        if metadata.get("format") != DOMAIN_EXTRACTOR:
            raise DCDiTError(f"{path} is not a saved {DOMAIN_EXTRACTOR} (metadata format "
                             f"{metadata.get('format')!r})")
        model = cls(**json.loads(metadata["config"]), meta=json.loads(metadata.get("meta", "{}")))
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
    from dcdit.data.synthetic import render

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


# --- torch-fidelity registration ------------------------------------------------------------------------------------

def _register_with_torch_fidelity() -> None:
    """Make the domain classifier usable as `calculate_metrics(feature_extractor='dcdit-synthetic-classifier',
    feature_extractor_weights_path=FILE)`."""
    try:
        from torch_fidelity.feature_extractor_base import FeatureExtractorBase
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    except ImportError:  # torch-fidelity is a dependency, but the classifier itself does not need it
        return
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

__all__ = ["INCEPTION", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "DOMAIN_EXTRACTOR", "Extractor",
           "DomainClassifier", "build_extractor", "resolve_inception_weights", "inception_cache_path",
           "file_sha256", "as_uint8_nchw", "inception_identity", "INCEPTION_DIMS",
           "validate_inception_weights", "train_domain_classifier", "domain_classifier_key", "DEFAULT_RECIPE"]
