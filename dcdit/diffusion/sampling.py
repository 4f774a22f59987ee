"""Ancestral (DDPM) and DDIM samplers over a GaussianDiffusion, with reproducible noise.

All noise, including x_T, comes from a `NoiseSource`: one generator for the batch, or one generator per sample
so that sample i depends only on its own seed and not on which other samples share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dcdit.diffusion.gaussian import GaussianDiffusion, extract
from dcdit.errors import DCDiTError

ModelFn = Callable[..., torch.Tensor]  # model_fn(x, t, y, **model_kwargs) -> model output


class NoiseSource:
    """Standard normal noise for a batch, from the global RNG, one generator, or one generator per sample."""

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None = None):
        if isinstance(generator, torch.Generator) or generator is None:
            self.generator, self.per_sample = generator, None
        else:
            self.generator, self.per_sample = None, list(generator)

    def randn(self, shape: Sequence[int], *, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A (B, ...) standard normal tensor on `device`."""
        shape = tuple(shape)
        # Noise is drawn in float32 on the generator's own device, so a seed gives the same numbers whatever the
        # sampling dtype, and CPU generators can drive GPU sampling.
        if self.per_sample is not None:
            if len(self.per_sample) != shape[0]:
                raise DCDiTError(f"got {len(self.per_sample)} generators for a batch of {shape[0]}; "
                                 "pass one per sample")
            parts = [torch.randn(shape[1:], generator=g, device=g.device) for g in self.per_sample]
            return torch.stack(parts).to(device=device, dtype=dtype)
        if self.generator is not None:
            noise = torch.randn(shape, generator=self.generator, device=self.generator.device)
            return noise.to(device=device, dtype=dtype)
        return torch.randn(shape, device=device, dtype=dtype)


def per_sample_generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One freshly seeded generator per seed."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def ddpm_step(diffusion: GaussianDiffusion, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor | None, clip_denoised: bool = False) -> torch.Tensor:
    """x_{t-1} ~ p(x_{t-1} | x_t); `noise` may be None only at t = 0, where the mean is returned."""
    pred = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    if noise is None:
        return pred.mean
    nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return pred.mean + nonzero * torch.exp(0.5 * pred.log_variance) * noise


def ddim_step(diffusion: GaussianDiffusion, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor | None, eta: float = 0.0, clip_denoised: bool = False) -> torch.Tensor:
    """DDIM update (Song et al., eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""
    pred = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    # Re-derive eps from x0 so that clipping x0 is reflected in the direction term.
    eps = diffusion.predict_eps_from_x0(x, t, pred.pred_x0)
    abar = extract(diffusion.alphas_cumprod, t, x)
    abar_prev = extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    mean = pred.pred_x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
    if noise is None:
        return mean
    nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return mean + nonzero * sigma * noise


def _initial_noise(source: NoiseSource, shape, noise: torch.Tensor | None, y, device, dtype) -> torch.Tensor:
    """x_T: the given noise, or a draw from the source."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise DCDiTError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
        return noise
    if device is None:
        device = y.device if isinstance(y, torch.Tensor) else "cpu"
    return source.randn(shape, device=device, dtype=dtype)


def _steps(diffusion: GaussianDiffusion, progress: bool):
    """Step indices T-1, ..., 0, optionally with a progress bar."""
    steps = list(range(diffusion.num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm  # lazy: only interactive runs need it

        steps = tqdm(steps)
    return steps


@torch.no_grad()
def ddpm_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int], y=None, *,
                generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = None,
                noise: torch.Tensor | None = None, clip_denoised: bool = False, progress: bool = False,
                model_kwargs: dict | None = None, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ancestral sampling over all of the diffusion's steps; returns x_0."""
    source = generator if isinstance(generator, NoiseSource) else NoiseSource(generator)
    x = _initial_noise(source, shape, noise, y, device, dtype)
    for i in _steps(diffusion, progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = model_fn(x, diffusion.model_timesteps(t), y, **(model_kwargs or {}))
        # The last step returns the mean, so it draws nothing.
        step_noise = source.randn(x.shape, device=x.device, dtype=x.dtype) if i > 0 else None
        x = ddpm_step(diffusion, out, x, t, step_noise, clip_denoised)
    return x


@torch.no_grad()
def ddim_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int], y=None, *,
                eta: float = 0.0,
                generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = None,
                noise: torch.Tensor | None = None, clip_denoised: bool = False, progress: bool = False,
                model_kwargs: dict | None = None, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DDIM sampling over all of the diffusion's steps (respace for fewer); returns x_0."""
    source = generator if isinstance(generator, NoiseSource) else NoiseSource(generator)
    x = _initial_noise(source, shape, noise, y, device, dtype)
    for i in _steps(diffusion, progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = model_fn(x, diffusion.model_timesteps(t), y, **(model_kwargs or {}))
        # With eta = 0 the path is deterministic after x_T, so no noise is drawn.
        step_noise = source.randn(x.shape, device=x.device, dtype=x.dtype) if i > 0 and eta > 0 else None
        x = ddim_step(diffusion, out, x, t, step_noise, eta, clip_denoised)
    return x
