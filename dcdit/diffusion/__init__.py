"""Gaussian diffusion for DiT and DC-DiT: schedule, loss, respacing, samplers and classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence

from dcdit.diffusion.gaussian import (
    GaussianDiffusion,
    MeanVariance,
    ModelPrediction,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    mean_flat,
    normal_kl,
)
from dcdit.diffusion.guidance import LITE_CFG, Guidance, cfg_model_fn
from dcdit.diffusion.respace import SpacedDiffusion, space_timesteps
from dcdit.diffusion.sampling import (
    NoiseSource,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    per_sample_generators,
)


def create_diffusion(timestep_respacing: str | int | Sequence[int] | None = "", num_timesteps: int = 1000,
                     learn_sigma: bool = True) -> GaussianDiffusion:
    """The paper's diffusion (linear schedule, T steps, learned sigma), respaced when asked ('250', 'ddim50')."""
    betas = linear_beta_schedule(num_timesteps)
    if timestep_respacing in ("", None):
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    return SpacedDiffusion(space_timesteps(num_timesteps, timestep_respacing), betas, learn_sigma=learn_sigma)


__all__ = [
    "GaussianDiffusion",
    "Guidance",
    "LITE_CFG",
    "MeanVariance",
    "ModelPrediction",
    "NoiseSource",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "cfg_model_fn",
    "create_diffusion",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "linear_beta_schedule",
    "mean_flat",
    "normal_kl",
    "per_sample_generators",
    "space_timesteps",
]
