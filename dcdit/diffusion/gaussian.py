"""Gaussian diffusion as in ADM and DiT: linear schedule, eps prediction, learned-range variance, MSE + VLB loss.

Schedule arithmetic runs once in float64 numpy; values are cast to the input's dtype and device at use.
The caller runs the model: `training_losses` and `p_mean_variance` take the model output, not the model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from dcdit.errors import DCDiTError


def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """ADM's linear betas, scaled so that any number of steps spans the same noise range as 1000."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats; scalars broadcast."""
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    logvar1, logvar2 = (torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """ADM's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability of x under a Gaussian discretised into 256 bins on [-1, 1], edge bins open-ended (nats)."""
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    centered = x - means
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    # Clamps keep log finite where the approximation saturates to exactly 0 or 1.
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))


def extract(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as a (B, 1, ..., 1) tensor with the dtype and device of `like`."""
    # float64 survives only when asked for; otherwise cast like ADM (float32) before the move, which MPS needs.
    source_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    picked = torch.as_tensor(values, dtype=source_dtype, device=t.device)[t]
    return picked.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


class MeanVariance(NamedTuple):
    """Mean, variance and log-variance of a diagonal Gaussian."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor


class ModelPrediction(NamedTuple):
    """The reverse step p(x_{t-1} | x_t) implied by a model output, with its x0 and eps predictions."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    eps: torch.Tensor


class GaussianDiffusion:
    """Forward process q, model-implied reverse process p, and the DiT training loss, for given betas."""

    def __init__(self, betas: np.ndarray, *, learn_sigma: bool = True):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise DCDiTError("betas must be a 1-D array with values in (0, 1]; use linear_beta_schedule(T)")
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; ADM borrows t=1's value so the log stays finite.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # ADM's "fixed large" variance, used when the model does not learn sigma.
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep indices the model sees for this diffusion's step indices (identity unless respaced)."""
        return t

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform random step indices in [0, T), as a long tensor of shape (batch,)."""
        # Draw where the generator lives so a CPU generator can seed GPU training.
        draw_device = generator.device if generator is not None else (device or "cpu")
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_device)
        return t if device is None else t.to(device)

    # --- forward process q ---

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> MeanVariance:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = extract(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return MeanVariance(mean, variance, log_variance)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given standard normal noise."""
        signal = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        return signal + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> MeanVariance:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = extract(self.posterior_mean_coef1, t, xt) * x0 + extract(self.posterior_mean_coef2, t, xt) * xt
        variance = extract(self.posterior_variance, t, xt).expand_as(xt)
        log_variance = extract(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        return MeanVariance(mean, variance, log_variance)

    # --- reverse process p ---

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        scaled_xt = extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
        return scaled_xt - extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps that maps x0 to x_t at step t."""
        scaled_xt = extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
        return (scaled_xt - x0) / extract(self.sqrt_recipm1_alphas_cumprod, t, xt)

    def split_model_output(self, model_output: torch.Tensor,
                           xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, variance values in [-1, 1] or None) from a model output of C or 2C channels."""
        channels = xt.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape != (xt.shape[0], expected, *xt.shape[2:]):
            raise DCDiTError(
                f"model output has shape {tuple(model_output.shape)}, expected ({xt.shape[0]}, {expected}, "
                f"{', '.join(map(str, xt.shape[2:]))}); check that the model's learn_sigma matches the diffusion's "
                f"(learn_sigma={self.learn_sigma})"
            )
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def p_mean_variance(self, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> ModelPrediction:
        """p(x_{t-1} | x_t) from an eps-predicting model output (learned-range variance when learn_sigma)."""
        eps, var_values = self.split_model_output(model_output, xt)
        if var_values is None:
            log_variance = extract(self.fixed_log_variance, t, xt).expand_as(xt)
        else:
            # The model interpolates in log space between the posterior variance (v=-1) and beta_t (v=+1).
            min_log = extract(self.posterior_log_variance_clipped, t, xt)
            max_log = extract(self.log_betas, t, xt)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self.predict_x0_from_eps(xt, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean = self.q_posterior_mean_variance(pred_x0, xt, t).mean
        return ModelPrediction(mean, torch.exp(log_variance), log_variance, pred_x0, eps)

    # --- training loss ---

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits: KL(q posterior || p) for t > 0, decoder NLL at t = 0."""
        true = self.q_posterior_mean_variance(x0, xt, t)
        pred = self.p_mean_variance(model_output, xt, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true.mean, true.log_variance, pred.mean, pred.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, pred.mean, 0.5 * pred.log_variance)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample `mse` (eps), `vb` (learned variance only, mean frozen) and `loss` = mse + vb, like DiT."""
        # Low-precision outputs would swamp the small VLB term; the loss is computed in the data's precision.
        model_output = model_output.to(x0.dtype)
        eps, var_values = self.split_model_output(model_output, xt)
        mse = mean_flat((noise - eps) ** 2)
        if var_values is None:
            vb = torch.zeros_like(mse)
        else:
            # The VLB trains the variance only; the mean is trained by the MSE alone (Nichol & Dhariwal).
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, xt, t)
        return {"mse": mse, "vb": vb, "loss": mse + vb}
