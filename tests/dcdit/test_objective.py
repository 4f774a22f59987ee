"""The training objective's draws and terms: per-sample timesteps, noise and class dropout keyed by the sample's
place in the global batch, multi-budget tail dropping and its effect on the mask, the N curriculum, and the loss as
diffusion + lambda x ratio, each checked against a computation written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dcdit
from dcdit.diffusion import create_diffusion
from dcdit.models.chunking import ratio_loss
from dcdit.objective import (
    ChunkingLossConfig,
    TrainingObjective,
    budget_for_step,
    draw_samples,
    target_compression,
)

T = 1000


def tiny(**overrides):
    base = dict(depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10)
    return dcdit.create_model("DC-DiT-S", **{**base, **overrides})


def by_hand(seed: int, step: int, index: int, shape, p_drop: float):
    """Sample `index`'s draws written out: numpy's SeedSequence([seed, step, index]) halved to 63 bits seeds one CPU
    generator, which draws t, then u (dropped when u < p_drop), then the noise."""
    key = int(np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0]) >> 1
    g = torch.Generator().manual_seed(key)
    t = int(torch.randint(0, T, (1,), generator=g))
    u = float(torch.rand(1, generator=g))
    return t, u < p_drop, torch.randn(shape, generator=g)


def test_each_sample_draws_from_its_own_key_whatever_batch_it_is_in():
    x0 = torch.zeros(8, 3, 4, 4)
    whole = draw_samples(x0, seed=5, step=9, first=0, num_timesteps=T, class_dropout_prob=0.5)
    for i in range(8):
        t, drop, noise = by_hand(5, 9, i, (3, 4, 4), 0.5)
        assert int(whole.t[i]) == t and bool(whole.drop[i]) == drop and torch.equal(whole.noise[i], noise)
    # The same samples in micro-batches of 2 (worker r, micro-step m: first = 2 * (2r + m)) draw the same numbers.
    parts = [draw_samples(x0[:2], seed=5, step=9, first=f, num_timesteps=T, class_dropout_prob=0.5)
             for f in (0, 2, 4, 6)]
    assert torch.equal(torch.cat([p.t for p in parts]), whole.t)
    assert torch.equal(torch.cat([p.noise for p in parts]), whole.noise)
    assert torch.equal(torch.cat([p.drop for p in parts]), whole.drop)
    # A new step or seed draws anew.
    other = draw_samples(x0, seed=5, step=10, first=0, num_timesteps=T, class_dropout_prob=0.5)
    assert not torch.equal(other.noise, whole.noise) and not torch.equal(other.t, whole.t)


def test_class_dropout_drops_about_p_of_the_labels_and_feeds_the_null_class():
    draws = draw_samples(torch.zeros(4000, 1, 1, 1), seed=0, step=1, first=0, num_timesteps=T,
                         class_dropout_prob=0.1)
    # Binomial(4000, 0.1): mean 400, sd 19; 6 sd either side.
    assert 286 <= int(draws.drop.sum()) <= 514
    assert not draw_samples(torch.zeros(64, 1, 1, 1), seed=0, step=1, first=0, num_timesteps=T,
                            class_dropout_prob=0.0).drop.any()

    model = tiny(class_dropout_prob=0.5)
    seen = {}
    model.y_embedder.embedding_table.register_forward_pre_hook(lambda m, args: seen.update(labels=args[0].clone()))
    objective = TrainingObjective(create_diffusion(num_timesteps=T), routed=True, downsample_factor=4.0,
                                  class_dropout_prob=0.5, seed=2)
    x0, y = torch.randn(16, 4, 8, 8), torch.arange(16) % 10
    objective(model, x0, y, step=3, first=32)
    drop = torch.tensor([by_hand(2, 3, 32 + i, (4, 8, 8), 0.5)[1] for i in range(16)])
    assert 0 < int(drop.sum()) < 16  # some of each, so the check below can tell them apart
    assert torch.equal(seen["labels"], torch.where(drop, torch.tensor(10), y))  # 10: the null class


def test_the_objective_noises_each_sample_with_its_own_draws():
    model = tiny()
    diffusion = create_diffusion(num_timesteps=T)
    seen = {}
    model.x_embedder.register_forward_pre_hook(lambda m, args: seen.update(xt=args[0].clone()))
    model.t_embedder.register_forward_pre_hook(lambda m, args: seen.update(t=args[0].clone()))
    objective = TrainingObjective(diffusion, routed=True, downsample_factor=4.0, class_dropout_prob=0.1, seed=4)
    x0 = torch.randn(3, 4, 8, 8)
    objective(model, x0, torch.tensor([1, 2, 3]), step=7, first=5)
    for i in range(3):
        t, _, noise = by_hand(4, 7, 5 + i, (4, 8, 8), 0.1)
        a_bar = float(np.prod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64)[:t + 1]))  # DDPM's linear betas
        expected = np.sqrt(a_bar) * x0[i] + np.sqrt(1 - a_bar) * noise
        assert int(seen["t"][i]) == t
        torch.testing.assert_close(seen["xt"][i], expected.float(), rtol=1e-5, atol=1e-5)


def test_multi_budget_draws_rho_per_step_after_its_warmup():
    config = ChunkingLossConfig(multi_budget=True, budget_fractions=(0.0, 0.25, 0.5), budget_warmup_steps=10)
    assert [budget_for_step(config, s, seed=1) for s in range(10)] == [0.0] * 10
    drawn = [budget_for_step(config, s, seed=1) for s in range(10, 310)]
    # Each fraction about a third of the time (Binomial(300, 1/3): mean 100, sd 8.2; 5 sd).
    assert {rho: drawn.count(rho) for rho in (0.0, 0.25, 0.5)} == pytest.approx({0.0: 100, 0.25: 100, 0.5: 100},
                                                                                   abs=41)
    assert drawn == [budget_for_step(config, s, seed=1) for s in range(10, 310)]  # a function of (seed, step)
    assert drawn != [budget_for_step(config, s, seed=2) for s in range(10, 310)]
    off = ChunkingLossConfig(multi_budget=False, budget_fractions=(0.5,), budget_warmup_steps=0)
    assert budget_for_step(off, 1000, seed=1) == 0.0


def test_multi_budget_tail_drops_the_lowest_p_of_the_routers_kept_tokens():
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():
        model.router.scorer[-1].bias.fill_(0.5)  # keep about 60% so that tail dropping has tokens to drop
    chunking = ChunkingLossConfig(multi_budget=True, budget_fractions=(0.5,), budget_warmup_steps=0,
                                  ratio_group_size=4)
    objective = TrainingObjective(create_diffusion(num_timesteps=T), routed=True, downsample_factor=4.0,
                                  class_dropout_prob=0.1, chunking=chunking)
    out = objective(model, torch.randn(4, 4, 8, 8), torch.arange(4), step=1)
    r = out.routing
    assert out.tail_drop == 0.5
    for b in range(4):
        kept = r.router_mask[b].nonzero().flatten().tolist()
        n_drop = len(kept) // 2  # floor(0.5 x kept)
        lowest = sorted(kept, key=lambda i: (float(r.probs[b, i].detach()), i))[:n_drop]
        expected = r.router_mask[b].clone()
        expected[lowest] = False
        assert n_drop > 0 and torch.equal(r.mask[b], expected)
    # The ratio loss sees the router's own mask, before tail dropping.
    torch.testing.assert_close(out.ratio_loss, ratio_loss(r.router_mask, r.probs, 4.0, 4))


def test_the_curriculum_ramps_n_linearly_and_the_ratio_loss_uses_it():
    config = ChunkingLossConfig(curriculum_start=2.0, curriculum_steps=100)
    assert [target_compression(config, 4.0, s) for s in (0, 25, 50, 100, 500)] == [2.0, 2.5, 3.0, 4.0, 4.0]
    assert target_compression(ChunkingLossConfig(), 4.0, 0) == 4.0

    model = tiny()
    objective = TrainingObjective(create_diffusion(num_timesteps=T), routed=True, downsample_factor=4.0,
                                  class_dropout_prob=0.1, chunking=ChunkingLossConfig(
                                      curriculum_start=2.0, curriculum_steps=100, ratio_loss_weight=0.5,
                                      ratio_group_size=2))
    out = objective(model, torch.randn(4, 4, 8, 8), torch.arange(4), step=50)
    assert out.target_n == 3.0
    r = out.routing
    # The ratio loss at N = 3 by hand: groups of 2 samples, L = N/(N-1) ((1-F)(1-G) + (N-1) F G).
    groups = []
    for g in (slice(0, 2), slice(2, 4)):
        f, p = float(r.router_mask[g].float().mean()), float(r.probs[g].double().mean())
        groups.append(3 / 2 * ((1 - f) * (1 - p) + 2 * f * p))
    assert float(out.ratio_loss) == pytest.approx(sum(groups) / 2, rel=1e-5)
    assert float(out.loss) == pytest.approx(float(out.diffusion_loss) + 0.5 * sum(groups) / 2, rel=1e-5)
