"""Gaussian diffusion, respacing and samplers against closed forms and independent numpy/torch computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dcdit.diffusion import (
    GaussianDiffusion,
    NoiseSource,
    SpacedDiffusion,
    create_diffusion,
    ddim_sample,
    ddpm_sample,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    normal_kl,
    per_sample_generators,
    space_timesteps,
)
from dcdit.errors import DCDiTError

T = 100


def reference_schedule(num_timesteps: int) -> dict[str, np.ndarray]:
    """The ADM linear schedule and its derived quantities, written out directly in float64."""
    scale = 1000.0 / num_timesteps
    betas = np.array([scale * 1e-4 + (scale * 0.02 - scale * 1e-4) * i / (num_timesteps - 1)
                      for i in range(num_timesteps)])
    alphas = 1.0 - betas
    abar = np.array([np.prod(alphas[: i + 1]) for i in range(num_timesteps)])
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return {"betas": betas, "alphas": alphas, "abar": abar, "abar_prev": abar_prev}


def f64(x) -> torch.Tensor:
    """A float64 tensor."""
    return torch.as_tensor(x, dtype=torch.float64)


def bcast(values: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) for 4-D tensors."""
    return f64(values[t.numpy()]).view(-1, 1, 1, 1)


@pytest.fixture
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(linear_beta_schedule(T), learn_sigma=True)


# --- schedule and forward process ---


def test_linear_schedule_endpoints_and_scaling():
    """ADM linear: 1e-4 .. 0.02 at T=1000; both ends scale by 1000/T."""
    betas = linear_beta_schedule(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    short = linear_beta_schedule(250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_q_sample_matches_closed_form(diffusion):
    """q(x_t|x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I), and q_sample is its reparameterisation."""
    ref = reference_schedule(T)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 37, 98, 99])
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, bcast(np.sqrt(ref["abar"]), t) * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, (1 - bcast(ref["abar"], t)).expand_as(x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_var, torch.log(var), rtol=1e-10, atol=1e-12)
    xt = diffusion.q_sample(x0, t, noise)
    expected = bcast(np.sqrt(ref["abar"]), t) * x0 + bcast(np.sqrt(1 - ref["abar"]), t) * noise
    torch.testing.assert_close(xt, expected, rtol=1e-12, atol=1e-12)


def test_q_sample_empirical_moments(diffusion):
    """Many draws of x_t for a fixed x0 have the closed-form mean and variance."""
    abar = reference_schedule(T)["abar"][40]
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 1.7, dtype=torch.float64)
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xt = diffusion.q_sample(x0, torch.full((n,), 40), noise)
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 1.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - abar, rel=1e-2)


# --- posterior ---


def test_posterior_matches_closed_form(diffusion):
    """Posterior mean coefficients and variance from DDPM eq. 7; t=0's log-variance borrows t=1's."""
    ref = reference_schedule(T)
    beta, alpha, abar, abar_prev = ref["betas"], ref["alphas"], ref["abar"], ref["abar_prev"]
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 99])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)

    coef_x0 = np.sqrt(abar_prev) * beta / (1 - abar)
    coef_xt = np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
    post_var = beta * (1 - abar_prev) / (1 - abar)
    torch.testing.assert_close(mean, bcast(coef_x0, t) * x0 + bcast(coef_xt, t) * xt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, bcast(post_var, t).expand_as(xt), rtol=1e-12, atol=1e-15)
    assert var[0].abs().max().item() == 0.0  # q(x_{-1}|x_0, x_0) is a point mass
    clipped = np.log(np.where(np.arange(T) == 0, post_var[1], post_var))
    torch.testing.assert_close(log_var, bcast(clipped, t).expand_as(xt), rtol=1e-12, atol=1e-12)


def test_posterior_is_bayes_rule(diffusion):
    """For a scalar, q(x_{t-1}|x_t,x0) ∝ q(x_{t-1}|x0) q(x_t|x_{t-1}), evaluated numerically on a grid."""
    ref = reference_schedule(T)
    t_idx, x0_val, xt_val = 30, 0.8, -0.4
    grid = np.linspace(-6, 6, 400_001)
    prior_mean, prior_var = math.sqrt(ref["abar_prev"][t_idx]) * x0_val, 1 - ref["abar_prev"][t_idx]
    lik_mean, lik_var = math.sqrt(ref["alphas"][t_idx]) * grid, ref["betas"][t_idx]
    log_post = -((grid - prior_mean) ** 2) / (2 * prior_var) - (xt_val - lik_mean) ** 2 / (2 * lik_var)
    weights = np.exp(log_post - log_post.max())
    weights /= weights.sum()
    grid_mean = (weights * grid).sum()
    grid_var = (weights * (grid - grid_mean) ** 2).sum()

    mean, var, _ = diffusion.q_posterior_mean_variance(
        f64([[[[x0_val]]]]), f64([[[[xt_val]]]]), torch.tensor([t_idx]))
    assert mean.item() == pytest.approx(grid_mean, abs=1e-6)
    assert var.item() == pytest.approx(grid_var, rel=1e-4)


# --- KL, decoder likelihood, learned variance, VLB ---


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(3)
    m1, m2, lv1, lv2 = (torch.randn(1000, generator=gen, dtype=torch.float64) for _ in range(4))
    expected = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)
    # scalars broadcast, as the prior term KL(q(x_T|x0) || N(0, 1)) uses them
    expected_std = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(0.0, 1.0))
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), expected_std, rtol=1e-10, atol=1e-12)


def exact_discretized_log_likelihood(x, means, log_scales):
    """The same 256-bin likelihood with the exact normal CDF (torch.special.ndtr)."""
    std = torch.exp(log_scales)
    upper = torch.special.ndtr((x + 1 / 255 - means) / std)
    lower = torch.special.ndtr((x - 1 / 255 - means) / std)
    probs = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
    return torch.log(probs)


def test_discretized_log_likelihood_matches_exact_cdf():
    """The tanh-CDF version agrees with the exact CDF, and probabilities over all 256 bins sum to one."""
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    means = (torch.rand(64, 1, generator=gen, dtype=torch.float64) * 2.4 - 1.2)
    log_scales = torch.rand(64, 1, generator=gen, dtype=torch.float64) * 3 - 5  # std 0.007 .. 0.14
    x = bins.expand(64, 256)
    approx = discretized_gaussian_log_likelihood(x, means, log_scales)
    exact = exact_discretized_log_likelihood(x, means, log_scales)
    torch.testing.assert_close(approx.exp(), exact.exp(), rtol=0, atol=5e-4)
    likely = exact > math.log(1e-2)  # where the bin holds real mass, log-probabilities agree closely too
    assert likely.sum() > 500
    torch.testing.assert_close(approx[likely], exact[likely], rtol=0, atol=2e-2)
    torch.testing.assert_close(approx.exp().sum(dim=1), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-3)


def test_learned_range_variance_endpoints(diffusion):
    """v = -1 gives the clipped posterior log-variance, v = +1 gives log beta_t, v = 0 their midpoint."""
    ref = reference_schedule(T)
    post_var = ref["betas"] * (1 - ref["abar_prev"]) / (1 - ref["abar"])
    min_log = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    max_log = np.log(ref["betas"])
    t = torch.tensor([0, 1, 60, 99])
    xt = torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    eps = torch.zeros_like(xt)
    for v, expected in [(-1.0, min_log), (1.0, max_log), (0.0, (min_log + max_log) / 2)]:
        out = torch.cat([eps, torch.full_like(xt, v)], dim=1)
        pred = diffusion.p_mean_variance(out, xt, t)
        torch.testing.assert_close(pred.log_variance, bcast(expected, t).expand_as(xt), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pred.variance, torch.exp(pred.log_variance))


def test_p_mean_from_eps_matches_hand_computation(diffusion):
    """pred_x0 = (x_t - sqrt(1-abar) eps)/sqrt(abar), and the mean is the posterior mean at pred_x0."""
    ref = reference_schedule(T)
    gen = torch.Generator().manual_seed(5)
    xt = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 40, 99])
    pred = diffusion.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], dim=1), xt, t)
    x0 = (xt - bcast(np.sqrt(1 - ref["abar"]), t) * eps) / bcast(np.sqrt(ref["abar"]), t)
    # DDPM eq. 11: mu = (x_t - beta/sqrt(1-abar) eps) / sqrt(alpha)
    mu = (xt - bcast(ref["betas"] / np.sqrt(1 - ref["abar"]), t) * eps) / bcast(np.sqrt(ref["alphas"]), t)
    torch.testing.assert_close(pred.pred_x0, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pred.mean, mu, rtol=1e-10, atol=1e-10)
    clipped = diffusion.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], dim=1), xt, t, clip_denoised=True)
    assert clipped.pred_x0.abs().max() <= 1.0


def test_vb_term_kl_for_t_positive_and_decoder_nll_at_zero(diffusion):
    """vb is KL(q posterior || p)/ln 2 for t > 0 and the discretised decoder NLL/ln 2 at t = 0, mean over dims."""
    ref = reference_schedule(T)
    gen = torch.Generator().manual_seed(6)
    x0 = torch.rand(2, 2, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    eps = noise + 0.3 * torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    v = torch.rand(2, 2, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 25])
    xt = bcast(np.sqrt(ref["abar"]), t) * x0 + bcast(np.sqrt(1 - ref["abar"]), t) * noise
    vb = diffusion.training_losses(torch.cat([eps, v], dim=1), x0, xt, t, noise)["vb"]

    # p(x_{t-1}|x_t): DDPM eq. 11 mean, learned-range variance, all from the reference schedule
    mu = (xt - bcast(ref["betas"] / np.sqrt(1 - ref["abar"]), t) * eps) / bcast(np.sqrt(ref["alphas"]), t)
    post_var = ref["betas"] * (1 - ref["abar_prev"]) / (1 - ref["abar"])
    min_log = bcast(np.log(np.concatenate([[post_var[1]], post_var[1:]])), t)
    log_var = (v + 1) / 2 * bcast(np.log(ref["betas"]), t) + (1 - v) / 2 * min_log

    nll0 = -exact_discretized_log_likelihood(x0[0], mu[0], 0.5 * log_var[0]).mean() / math.log(2)
    assert vb[0].item() == pytest.approx(nll0.item(), rel=2e-2)

    i, s = 1, 25
    q_mean = (np.sqrt(ref["abar_prev"][s]) * ref["betas"][s] * x0[i]
              + np.sqrt(ref["alphas"][s]) * (1 - ref["abar_prev"][s]) * xt[i]) / (1 - ref["abar"][s])
    q = Normal(q_mean, math.sqrt(post_var[s]))
    p = Normal(mu[i], torch.exp(0.5 * log_var[i]))
    kl = kl_divergence(q, p).mean() / math.log(2)
    assert vb[1].item() == pytest.approx(kl.item(), rel=1e-9)


def test_training_losses_mse_and_gradient_routing(diffusion):
    """mse is mean((noise - eps)^2); vb's gradient reaches only the variance channels; loss = mse + vb."""
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(3, 2, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0, 10, 90])
    xt = diffusion.q_sample(x0, t, noise)
    output = torch.randn(3, 4, 4, 4, generator=gen).requires_grad_()
    losses = diffusion.training_losses(output, x0, xt, t, noise)
    assert set(losses) == {"mse", "vb", "loss"} and all(v.shape == (3,) for v in losses.values())

    mse_by_hand = ((noise - output[:, :2].detach()) ** 2).flatten(1).mean(dim=1)
    torch.testing.assert_close(losses["mse"], mse_by_hand)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])

    (vb_grad,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert vb_grad[:, :2].abs().max().item() == 0.0
    assert (vb_grad[:, 2:].abs().flatten(1).sum(dim=1) > 0).all()
    (loss_grad,) = torch.autograd.grad(losses["loss"].sum(), output)
    torch.testing.assert_close(loss_grad[:, :2], -2 * (noise - output[:, :2].detach()) / 32)


def test_fixed_variance_without_learned_sigma():
    """Without learned sigma the model outputs C channels, vb is zero and the variance is ADM's 'fixed large'."""
    ref = reference_schedule(T)
    diff = GaussianDiffusion(linear_beta_schedule(T), learn_sigma=False)
    xt = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 50])
    pred = diff.p_mean_variance(torch.zeros_like(xt), xt, t)
    post_var = ref["betas"] * (1 - ref["abar_prev"]) / (1 - ref["abar"])
    fixed_large = np.concatenate([[post_var[1]], ref["betas"][1:]])
    torch.testing.assert_close(pred.variance, bcast(fixed_large, t).expand_as(xt))
    losses = diff.training_losses(torch.zeros_like(xt), xt, xt, t, torch.zeros_like(xt))
    assert (losses["vb"] == 0).all()
    with pytest.raises(DCDiTError, match="learn_sigma"):
        diff.p_mean_variance(torch.zeros(2, 6, 2, 2, dtype=torch.float64), xt, t)


def test_sample_timesteps_uniform_and_seeded(diffusion):
    a = diffusion.sample_timesteps(20_000, torch.Generator().manual_seed(0))
    b = diffusion.sample_timesteps(20_000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.long
    counts = torch.bincount(a, minlength=T)
    assert counts.numel() == T and counts.min() > 120 and counts.max() < 290  # expected 200 each


# --- respacing ---


def test_space_timesteps_sections_and_ddim():
    """ADM semantics: equal sections, evenly spaced (rounded) steps per section; 'ddimN' is a plain stride."""
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10") == [round(i * 99 / 9) for i in range(10)]
    assert space_timesteps(100, 10) == space_timesteps(100, "10") == space_timesteps(100, [10])
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    sections = space_timesteps(300, [10, 15, 20])
    assert len(sections) == 45
    for lo, count in [(0, 10), (100, 15), (200, 20)]:
        inside = [s for s in sections if lo <= s < lo + 100]
        assert len(inside) == count and inside[0] == lo and inside[-1] == lo + 99
    assert space_timesteps(10, "3,2") == [0, 2, 4, 5, 9]  # sections of 5 and 5
    assert space_timesteps(100, "100") == list(range(100))
    for bad in ["ddim11", "ddimx", "abc", "200", [0], "ddim0"]:
        with pytest.raises(DCDiTError):
            space_timesteps(100, bad)


def test_spaced_diffusion_keeps_alphas_cumprod():
    ref = reference_schedule(1000)
    kept = space_timesteps(1000, "250")
    spaced = SpacedDiffusion(kept, linear_beta_schedule(1000))
    assert spaced.num_timesteps == 250 and spaced.original_num_steps == 1000
    np.testing.assert_allclose(spaced.alphas_cumprod, ref["abar"][kept], rtol=1e-12)
    np.testing.assert_array_equal(spaced.timestep_map, kept)


def test_model_receives_original_timesteps():
    spaced = create_diffusion("10", num_timesteps=T)
    seen = []

    def model_fn(x, t, y):
        seen.append(t.tolist())
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    ddpm_sample(spaced, model_fn, (2, 1, 2, 2), None, generator=torch.Generator().manual_seed(0))
    kept = space_timesteps(T, "10")
    assert seen == [[s, s] for s in reversed(kept)]


def test_create_diffusion():
    full = create_diffusion()
    assert type(full) is GaussianDiffusion and full.num_timesteps == 1000 and full.learn_sigma
    spaced = create_diffusion("250")
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 250
    assert not create_diffusion(num_timesteps=T, learn_sigma=False).learn_sigma
    assert create_diffusion(50, num_timesteps=T).num_timesteps == 50


# --- samplers ---


def toy_model(x, t, y=None):
    """A deterministic per-sample denoiser: eps = 0.1 x (+ t dependence), variance value 0."""
    scale = 0.1 + 1e-3 * t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return torch.cat([scale * x, torch.zeros_like(x)], dim=1)


@pytest.mark.parametrize("sampler", [ddpm_sample, lambda *a, **k: ddim_sample(*a, eta=0.5, **k)])
def test_samplers_deterministic_under_seed(diffusion, sampler):
    shape = (2, 2, 4, 4)
    a = sampler(diffusion, toy_model, shape, None, generator=torch.Generator().manual_seed(0))
    b = sampler(diffusion, toy_model, shape, None, generator=torch.Generator().manual_seed(0))
    c = sampler(diffusion, toy_model, shape, None, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_ddim_eta_zero_only_uses_initial_noise(diffusion):
    """With eta = 0 the result depends on x_T only: same x_T, different generators, same output."""
    x_t = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(diffusion, toy_model, x_t.shape, None, noise=x_t, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(diffusion, toy_model, x_t.shape, None, noise=x_t, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddpm_sample(diffusion, toy_model, x_t.shape, None, noise=x_t, generator=torch.Generator().manual_seed(1))
    d = ddpm_sample(diffusion, toy_model, x_t.shape, None, noise=x_t, generator=torch.Generator().manual_seed(2))
    assert (c - d).abs().max() > 1e-3


def constant_oracle(c: float, abar: np.ndarray):
    """The exact eps predictor when the data is the point mass x0 = c; t are original step indices."""
    def model_fn(x, t, y=None):
        a = bcast(abar, t).to(x.dtype)
        eps = (x - torch.sqrt(a) * c) / torch.sqrt(1 - a)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)
    return model_fn


@pytest.mark.parametrize("respacing", ["", "ddim10"])
def test_samplers_recover_point_mass_with_oracle(respacing):
    abar = reference_schedule(T)["abar"]
    diff = create_diffusion(respacing, num_timesteps=T)
    model_fn = constant_oracle(0.37, abar)
    shape = (8, 2, 2, 2)
    for sample in (ddim_sample(diff, model_fn, shape, None, generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64),
                   ddpm_sample(diff, model_fn, shape, None, generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64)):
        torch.testing.assert_close(sample, torch.full(shape, 0.37, dtype=torch.float64), rtol=0, atol=1e-8)


def gaussian_oracle(mu: float, s: float, abar: np.ndarray):
    """E[eps | x_t] for data x0 ~ N(mu, s^2): sqrt(1-abar)(x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
    def model_fn(x, t, y=None):
        a = bcast(abar, t).to(x.dtype)
        eps = torch.sqrt(1 - a) * (x - torch.sqrt(a) * mu) / (a * s**2 + 1 - a)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)
    return model_fn


def test_respaced_ddim_matches_scalar_reference():
    """Respaced DDIM (eta=0) with the exact Gaussian eps equals DDIM eq. 12 iterated in numpy over the kept abar."""
    abar_full = reference_schedule(T)["abar"]
    mu, s = 0.5, 0.3
    diff = create_diffusion("ddim20", num_timesteps=T)
    kept = list(range(0, T, 5))
    x_t = torch.randn(1000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample = ddim_sample(diff, gaussian_oracle(mu, s, abar_full), x_t.shape, None, noise=x_t)

    x = x_t.flatten().numpy().copy()
    for k in reversed(range(len(kept))):
        a = abar_full[kept[k]]
        a_prev = abar_full[kept[k - 1]] if k > 0 else 1.0
        eps = np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / (a * s**2 + 1 - a)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    np.testing.assert_allclose(sample.flatten().numpy(), x, rtol=1e-10, atol=1e-12)


def test_ddim_lands_on_data_distribution():
    """Full-step DDIM with the exact Gaussian eps maps N(0, 1) to about N(mu, s^2) (few steps under-disperse)."""
    abar_full = reference_schedule(T)["abar"]
    mu, s = 0.5, 0.5
    diff = create_diffusion("", num_timesteps=T)
    sample = ddim_sample(diff, gaussian_oracle(mu, s, abar_full), (4000, 1, 1, 1), None,
                         generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sample.mean().item() == pytest.approx(mu, abs=0.03)
    assert sample.std().item() == pytest.approx(s, rel=0.05)


def test_ddpm_lands_on_data_distribution():
    """DDPM with the exact Gaussian eps produces samples distributed like the data N(mu, s^2)."""
    abar_full = reference_schedule(T)["abar"]
    mu, s = -0.4, 0.5
    diff = create_diffusion("", num_timesteps=T)
    sample = ddpm_sample(diff, gaussian_oracle(mu, s, abar_full), (4000, 1, 1, 1), None,
                         generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sample.mean().item() == pytest.approx(mu, abs=0.03)
    assert sample.std().item() == pytest.approx(s, rel=0.05)


@pytest.mark.parametrize("sampler", [ddpm_sample, lambda *a, **k: ddim_sample(*a, eta=1.0, **k)])
def test_per_sample_generators_independent_of_batch(diffusion, sampler):
    """Sample i is the same whether generated in a batch of 4 or alone, given its own seeded generator."""
    seeds = [11, 12, 13, 14]
    batch = sampler(diffusion, toy_model, (4, 2, 3, 3), None, generator=per_sample_generators(seeds))
    for i, seed in enumerate(seeds):
        alone = sampler(diffusion, toy_model, (1, 2, 3, 3), None, generator=per_sample_generators([seed]))
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=0)
    swapped = sampler(diffusion, toy_model, (2, 2, 3, 3), None, generator=per_sample_generators([14, 11]))
    torch.testing.assert_close(swapped, batch[[3, 0]], rtol=0, atol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3


def test_noise_source_checks_and_dtype():
    with pytest.raises(DCDiTError, match="one per sample"):
        NoiseSource(per_sample_generators([1, 2])).randn((3, 2), device="cpu")
    # a seed gives the same numbers whatever the sampling dtype
    a = NoiseSource(torch.Generator().manual_seed(5)).randn((2, 3), device="cpu", dtype=torch.float64)
    b = NoiseSource(torch.Generator().manual_seed(5)).randn((2, 3), device="cpu", dtype=torch.float32)
    assert a.dtype == torch.float64 and torch.equal(a.float(), b)
