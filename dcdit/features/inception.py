"""torch-fidelity's Inception-v3 (the TF 2015-12-05 port every FID paper uses): where its weights live offline,
refusing files that are not its state dict, and the extractor with pool_3 (FID), logits (IS) and the sFID map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from dcdit.errors import DCDiTError
from dcdit.features.extractor import FEATURES_VERSION, INCEPTION, Extractor, checked_weights_copy, file_sha256
from dcdit.safeload import load_weights_only

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         f"{INCEPTION_WEIGHTS_FILE}")
# sFID: the first 7 channels of TF Inception's mixed_6/conv (Mixed_6d.branch1x1 here), 17x17x7 flattened
# channels-last as in ADM's evaluator, so its numbers compare with ADM reference batches' mu_s/sigma_s.
SPATIAL_MODULE, SPATIAL_CHANNELS = "Mixed_6d.branch1x1", 7


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


def validate_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The Inception state dict in `path`, read without running code; files that are not one (pickled code,
    other models) are refused."""
    state = load_weights_only(path)
    if not isinstance(state, dict) or f"{SPATIAL_MODULE}.conv.weight" not in state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise DCDiTError(f"{path} is not an Inception-v3 (torch-fidelity) state dict; pass the file "
                         f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}")
    return state


def inception_extractor(weights, *, logits: bool, spatial: bool, device, batch_size: int) -> Extractor:
    """The Inception extractor on the weights file `weights` (None: the torch.hub cache)."""
    path = resolve_inception_weights(weights)
    layers = ["2048", "logits_unbiased"] if logits else ["2048"]
    # torch-fidelity unpickles its weights file with weights_only=False: it gets a copy of the checked tensors.
    with checked_weights_copy(validate_inception_weights(path)) as checked:
        net = FeatureExtractorInceptionV3(INCEPTION, layers, feature_extractor_weights_path=checked)
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




__all__ = ["INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "INCEPTION_DIMS", "inception_cache_path",
           "resolve_inception_weights", "validate_inception_weights", "inception_extractor", "inception_identity"]
