"""Sample generation for evaluation: class-balanced labels, one seed per sample, guidance and tail drop, uint8 images.

Sample i has label i mod num_classes and its own noise generator seeded from (seed, i), so a sample set depends only
on (model, seed, sample indices, sampling settings): never on the batch it shares or the worker that computes it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from dcdit.data.vae import decode, sample_seed
from dcdit.diffusion import Guidance, create_diffusion, ddim_sample, ddpm_sample, per_sample_generators
from dcdit.flops import flop_counter

LITE_CFG_UNCOND_DROP = 0.9  # Lite-CFG: the unconditional branch tail-drops (at least) 90% of its kept tokens


def sample_labels(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Sample i has label i mod num_classes: class-balanced in every prefix (50 per class for 50K on ImageNet)."""
    return (np.asarray(indices, dtype=np.int64) % num_classes).astype(np.int64)


def quantize(images: torch.Tensor) -> np.ndarray:
    """Float NCHW in [-1, 1] -> uint8 NHWC, rounding to nearest (DiT's clamp(127.5 x + 128) then truncation)."""
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@dataclass(frozen=True)
class SamplingPlan:
    """How samples are drawn: sampler and steps, guidance (or Lite-CFG), tail drop, labels and seeds."""

    sampler: str  # "ddpm" | "ddim" (eta 0)
    steps: int  # respaced sampling steps
    num_timesteps: int  # the training diffusion's T
    learn_sigma: bool
    cfg_scale: float  # 1 = no classifier-free guidance
    lite_cfg: bool  # DC-DiT's Lite-CFG: a cheap, tail-dropped unconditional branch
    rho: float | None  # tail-drop fraction of the kept tokens (routed models only)
    null_class: int  # the model's label for "no class" (the unconditional branch)
    seed: int  # base seed: sample i draws from sample_seed(seed, i)
    num_classes: int  # labels are i mod num_classes

    def guidance(self) -> Guidance | None:
        """The classifier-free guidance wrapper's setting (DiT convention: the first 3 eps channels), or None."""
        if self.lite_cfg:
            rho = self.rho or 0.0
            return Guidance(scale=self.cfg_scale, guided_channels=3,
                            tail_drop=(rho, max(LITE_CFG_UNCOND_DROP, rho)))
        if self.cfg_scale > 1.0:
            tail = (self.rho, self.rho) if self.rho else None
            return Guidance(scale=self.cfg_scale, guided_channels=3, tail_drop=tail)
        return None

    def forwards_per_step(self) -> int:
        return 2 if self.guidance() is not None else 1


def generate(model: torch.nn.Module, plan: SamplingPlan, indices: np.ndarray, shape: tuple[int, int, int], *,
             device: torch.device, vae=None, count_flops: bool = False) -> tuple[np.ndarray, float | None]:
    """uint8 NHWC images of samples `indices` (decoded with `vae` when the model makes latents), and the FLOPs of
    their model calls when `count_flops` (else None)."""
    respacing = f"ddim{plan.steps}" if plan.sampler == "ddim" else str(plan.steps)
    diffusion = create_diffusion(respacing, num_timesteps=plan.num_timesteps, learn_sigma=plan.learn_sigma)
    y = torch.from_numpy(sample_labels(indices, plan.num_classes)).to(device)
    generators = per_sample_generators([sample_seed(plan.seed, int(i)) for i in indices])
    guidance = plan.guidance()
    model_fn = guidance.wrap(model, plan.null_class) if guidance is not None else model
    # Without guidance the tail drop goes to the model directly; the guidance wrapper sets it per branch.
    kwargs = {"tail_drop": float(plan.rho)} if plan.rho and guidance is None else {}
    sample = ddim_sample if plan.sampler == "ddim" else ddpm_sample
    counter = flop_counter() if count_flops else None
    with counter if counter is not None else contextlib.nullcontext():
        x = sample(diffusion, model_fn, (len(indices), *shape), y, generator=generators, device=device,
                   model_kwargs=kwargs)
    if vae is not None:
        x = decode(vae, x)
    flops = float(counter.get_total_flops()) if counter is not None else None
    return quantize(x), flops


__all__ = ["SamplingPlan", "generate", "sample_seed", "sample_labels", "quantize"]
