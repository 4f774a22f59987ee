"""Feature extractors for sample-quality metrics: torch-fidelity's Inception (FID, IS, sFID), a small domain
classifier for the synthetic dataset (FD and class fidelity, meaningful offline), and any other torch-fidelity
extractor (FD).

  extractor.py  the Extractor interface, uint8 image checks, file hashes
  inception.py  Inception-v3: weights offline, refusing foreign files, pool_3 / logits / sFID features
  domain.py     the synthetic dataset's domain classifier: training, caching, torch-fidelity registration
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torchvision
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dcdit.errors import DCDiTError, did_you_mean
from dcdit.features.domain import DEFAULT_RECIPE, DomainClassifier, domain_classifier_key, train_domain_classifier
from dcdit.features.extractor import (DOMAIN_EXTRACTOR, FEATURES_VERSION, INCEPTION, Extractor, as_uint8_nchw,
                                      checked_weights_copy, file_sha256)
from dcdit.features.inception import (INCEPTION_DIMS, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL,
                                      inception_cache_path, inception_extractor, inception_identity,
                                      resolve_inception_weights, validate_inception_weights)
from dcdit.safeload import load_state_dict_file


def build_extractor(name: str = INCEPTION, weights: str | os.PathLike | None = None, *, logits: bool = True,
                    spatial: bool = True, device: str | torch.device = "cpu", batch_size: int = 64) -> Extractor:
    """The extractor `name`: 'inception-v3-compat' (default), 'dcdit-synthetic-classifier' (needs `weights`),
    or any other torch-fidelity extractor (its FID layer only)."""
    if name == INCEPTION:
        return inception_extractor(weights, logits=logits, spatial=spatial, device=device, batch_size=batch_size)
    if name == DOMAIN_EXTRACTOR:
        if weights is None:
            raise DCDiTError(f"the {DOMAIN_EXTRACTOR} extractor needs --weights (a classifier saved by "
                             "DomainClassifier.save; `dcdit eval` trains and caches one itself)")
        return DomainClassifier.load(weights).extractor(device=device, batch_size=batch_size)
    return _torch_fidelity_extractor(name, weights, device=device, batch_size=batch_size)


def _torch_fidelity_extractor(name: str, weights, *, device, batch_size: int) -> Extractor:
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        known = [INCEPTION, DOMAIN_EXTRACTOR, *sorted(set(FEATURE_EXTRACTORS_REGISTRY) - {INCEPTION})]
        raise DCDiTError(f"unknown feature extractor {name!r}{did_you_mean(name, known)}; "
                         f"choose one of {', '.join(known)}")
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layer = cls.get_default_feature_layer_for_metric("fid")
    try:
        with _checked_weights(name, cls, weights) as path:
            kwargs = {"feature_extractor_weights_path": path} if path is not None else {}
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


# torch-fidelity extractors whose weights file dcdit can check (names and shapes of this architecture) before
# handing torch-fidelity a private copy; the others load files with code (TorchScript, torch.hub) or not at all.
_CHECKABLE_WEIGHTS = {"FeatureExtractorVGG16": lambda: torchvision.models.vgg16()}


@contextlib.contextmanager
def _checked_weights(name: str, cls: type, weights) -> Iterator[str | None]:
    """None without `weights` (torch-fidelity's own hash-checked download), else a private copy of the file's
    tensors after a weights-only read and a check of every name and shape against the architecture."""
    if weights is None:
        yield None
        return
    architecture = _CHECKABLE_WEIGHTS.get(cls.__name__)
    if architecture is None:
        raise DCDiTError(f"extractor {name} cannot take --weights here (it would load the file as TorchScript or "
                         f"code); run it without --weights, or use {INCEPTION}, {DOMAIN_EXTRACTOR} or vgg16")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in architecture().state_dict().items()}
    state = load_state_dict_file(weights, expected=expected, what=f"{name} weights")
    with checked_weights_copy(state) as path:
        yield path


__all__ = ["INCEPTION", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "DOMAIN_EXTRACTOR", "FEATURES_VERSION",
           "Extractor", "DomainClassifier", "build_extractor", "resolve_inception_weights", "inception_cache_path",
           "file_sha256", "as_uint8_nchw", "inception_identity", "INCEPTION_DIMS", "validate_inception_weights",
           "train_domain_classifier", "domain_classifier_key", "DEFAULT_RECIPE"]
