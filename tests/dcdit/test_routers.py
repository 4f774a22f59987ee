"""The control routers (random, grid) against hand-written lattices and their defining probabilities, and the
objective they train with."""

import math

import pytest
import torch

import dcdit
from dcdit.config import preset
from dcdit.diffusion import create_diffusion
from dcdit.errors import DCDiTError
from dcdit.models.attention import Packing
from dcdit.models.chunking import nearest_kept
from dcdit.models.routers import GridRouter, RandomRouter, sample_uniforms
from dcdit.objective import ChunkingLossConfig, TrainingObjective

TINY = dict(depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=10)


def control(router: str, n: float = 4.0, **overrides) -> torch.nn.Module:
    return dcdit.create_model("DC-DiT-S", **{**TINY, "router": router, "downsample_factor": n, **overrides})


def batch(size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 4, 8, 8, generator=gen), torch.randint(0, 1000, (size,), generator=gen),
            torch.randint(0, 10, (size,), generator=gen))


def test_random_router_probabilities_follow_their_definition_from_the_uniforms():
    n = 4.0
    x, t, _ = batch(6)
    u = sample_uniforms(x, t, 64)
    p = RandomRouter(n)(torch.zeros(6, 8, 8, 8), x, t)
    for b in range(6):
        for i in range(1, 63):
            ui = float(u[b, i])
            expected = 1 - ui * n / 2 if ui < 1 / n else (1 - ui) / (2 * (1 - 1 / n))
            assert float(p[b, i]) == pytest.approx(expected, abs=1e-6)
    assert bool((p[:, 0] == 1).all() and (p[:, -1] == 1).all())  # ends forced, as for the learned routers


def test_random_router_keeps_one_token_in_n_with_uniform_confidences():
    n = 4.0
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(64, 4, 16, 16, generator=gen), torch.randint(0, 1000, (64,), generator=gen)
    p = RandomRouter(n)(torch.zeros(64, 8, 16, 16), x, t)
    inner = p[:, 1:-1]
    kept = inner > 0.5
    trials = kept.numel()
    # Binomial(trials, 1/N): within 4 standard deviations of the mean.
    assert abs(kept.sum().item() - trials / n) < 4 * math.sqrt(trials * (1 / n) * (1 - 1 / n))
    # Kept confidences are U(0.5, 1], dropped ones U[0, 0.5]: means 0.75 and 0.25 (std of a mean << 0.01 here).
    assert inner[kept].mean().item() == pytest.approx(0.75, abs=0.01)
    assert inner[~kept].mean().item() == pytest.approx(0.25, abs=0.01)


def test_control_noise_is_a_function_of_each_sample_alone():
    x, t, _ = batch(5, seed=2)
    u = sample_uniforms(x, t, 64)
    torch.testing.assert_close(sample_uniforms(x, t, 64), u, rtol=0, atol=0)  # reproducible
    order = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(sample_uniforms(x[order], t[order], 64), u[order], rtol=0, atol=0)
    torch.testing.assert_close(sample_uniforms(x[2:3], t[2:3], 64), u[2:3], rtol=0, atol=0)
    assert not torch.equal(sample_uniforms(x, t + 1, 64), u)  # a new timestep (a new step) draws anew
    other = x.clone()
    other[0, 0, 0, 0] += 1e-3
    assert not torch.equal(sample_uniforms(other, t, 64)[0], u[0])
    assert torch.equal(sample_uniforms(other, t, 64)[1:], u[1:])


@pytest.mark.parametrize("n,kept_positions", [
    (4.0, [r * 8 + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]),  # p = 2: offset 0
    (16.0, [9, 13, 41, 45]),  # p = 4: offset 1, i.e. (1, 1), (1, 5), (5, 1), (5, 5)
])
def test_grid_router_keeps_one_token_per_patch_and_plug_back_is_patchify(n, kept_positions):
    patch = int(math.sqrt(n))
    x, t, _ = batch(3)
    p = GridRouter(patch, 8)(torch.zeros(3, 8, 8, 8), x, t)
    mask = p > 0.5
    for b in range(3):
        assert mask[b].nonzero().squeeze(1).tolist() == kept_positions
    assert bool((p[mask] <= 1).all()) and bool((p[~mask] == 0).all())
    # Every position takes the output of the kept token of its own p x p patch.
    source = nearest_kept(mask, 8, 8, Packing.from_lengths(mask.sum(1)))
    for b in range(3):
        for pos in range(64):
            r, c = divmod(pos, 8)
            own = kept_positions.index(next(k for k in kept_positions if k // 8 // patch == r // patch
                                            and k % 8 // patch == c // patch))
            assert int(source[b, pos]) == b * len(kept_positions) + own


def test_controls_have_no_router_parameters_no_ratio_loss_and_still_tail_drop():
    diffusion = create_diffusion(num_timesteps=1000)
    for router in ("random", "grid"):
        model = control(router)
        assert list(model.router.parameters()) == []
        assert not model.config.learned_router
        objective = TrainingObjective(diffusion, routed=True, downsample_factor=4.0, learned_router=False,
                                      class_dropout_prob=model.config.class_dropout_prob,
                                      chunking=ChunkingLossConfig(multi_budget=True, budget_warmup_steps=0))
        x, _, y = batch(4)
        out = objective(model, x, y, step=3)
        assert out.ratio_loss is None and torch.equal(out.loss, out.diffusion_loss)
        out.loss.backward()  # trains the rest of the model
        x, t, y = batch(4, seed=5)
        _, full = model(x, t, y, return_routing=True)
        _, dropped = model(x, t, y, tail_drop=0.5, return_routing=True)
        assert torch.equal(dropped.kept, full.kept - torch.floor(0.5 * full.kept.double() + 1e-9).long())
        assert torch.equal(dropped.mask & ~full.mask, torch.zeros_like(full.mask))


def test_grid_router_needs_a_square_compression_dividing_the_grid():
    with pytest.raises(DCDiTError, match=r"downsample_factor=8.0 must be p\*p"):
        preset("DC-DiT-S", **TINY, router="grid", downsample_factor=8)
    with pytest.raises(DCDiTError, match="must be p\\*p with p dividing input_size=12"):
        preset("DC-DiT-S", **{**TINY, "input_size": 12}, router="grid", downsample_factor=64)
    assert preset("DC-DiT-S", **TINY, router="grid", downsample_factor=16).grid_patch == 4
