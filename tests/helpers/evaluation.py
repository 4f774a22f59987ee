"""Helpers for the evaluator's tests: an offline stand-in for the Inception weights and tiny checkpoints.

The real Inception weights cannot be downloaded here, so tests build a state dict of torch-fidelity's own
Inception architecture with seeded random weights (batch-norm statistics calibrated on one batch so activations
stay well scaled) and pass it as --weights / feature_extractor_weights_path.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi
from PIL import Image

from dcdit.checkpoint import checkpoint_dir, save_checkpoint
from dcdit.models import build_model
from dcdit_platform.config import build_config


# The fields of a tiny model that only its family reads (dcdit.models.family's own_fields).
TINY_FAMILY_FIELDS = {
    "dit": {"patch_size": 2},
    "dcdit": {"scaffold_width": 16, "encoder_blocks": 1, "decoder_blocks": 1, "downsample_factor": 2},
}


@functools.lru_cache(maxsize=None)
def random_inception_weights(directory: str, seed: int = 0) -> str:
    """Path of a seeded random-init Inception-v3 (torch-fidelity architecture) state dict under `directory`."""
    path = Path(directory) / f"random-inception-seed{seed}.pth"
    if path.exists():
        return str(path)

    class Unloaded(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the seeded initialisation
            return None

    saved = tfi.load_state_dict_from_url
    tfi.load_state_dict_from_url = lambda *args, **kwargs: {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = Unloaded("inception-v3-compat", ["2048", "logits_unbiased"])
            images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed))
    finally:
        tfi.load_state_dict_from_url = saved
    # Calibrate batch norm on one batch (cumulative averages), so the random network neither explodes nor vanishes.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        net(images)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return str(path)


def write_png_folder(directory: Path, images: np.ndarray) -> Path:
    """uint8 NHWC images as 000000.png, 000001.png, ... in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"{i:06d}.png")
    return directory


def tiny_checkpoint(root: Path, *, arch: str = "dit", image_size: int = 8, num_classes: int = 4, seed: int = 0,
                    run_name: str = "tiny", step: int = 10, mlflow_run_id: str | None = None,
                    num_samples: int = 64) -> Path:
    """A checkpoint of a tiny untrained model on the synthetic data, as `dcdit train` lays it out:
    {root}/{run_name}/checkpoint_{step:08d} with config.json (an experiment config) and state.json; its model
    weights are its EMA weights plus noise."""
    model = {"arch": arch, "depth": 1, "hidden_size": 32, "num_heads": 2, "input_size": image_size,
             "in_channels": 3, "num_classes": num_classes, **TINY_FAMILY_FIELDS[arch]}
    data = {"name": run_name, "seed": seed, "model": model,
            "data": {"source": "synthetic", "image_size": image_size, "num_classes": num_classes,
                     "num_samples": num_samples},
            "train": {"steps": step, "global_batch": 8}, "storage": {"uri": str(root)},
            "resources": {"num_workers": 1}}
    config = build_config(data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(config.model)
        # An untrained DiT predicts zeros (adaLN-Zero); perturb the zero-initialised output layers so that
        # samples depend on the weights, the labels and the routing.
        for name, p in net.named_parameters():
            if "final_layer" in name or "adaLN" in name:
                p.data.normal_(0, 0.05)
        # The raw weights differ from the EMA (what is sampled), so evaluating the wrong ones shows.
        ema = net.state_dict()
        raw = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ema.items()}
    state = {"step": step, "mlflow_run_id": mlflow_run_id, "run_name": run_name}
    directory = checkpoint_dir(root / run_name, step)
    save_checkpoint(directory, model_state=raw, ema_state=ema, state=state, config=config.to_dict())
    return directory
