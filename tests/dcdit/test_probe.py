"""The router probe: AUC of the boundary probability against detail masks on a hand-made case, its bootstrap
intervals and verdicts, noise that depends only on (seed, t), and a real DC-DiT on synthetic images."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

import dcdit
from dcdit.diffusion import create_diffusion
from dcdit.models.chunking import Routing
from dcdit.probe import ProbeImages, probe_router, probe_timesteps, synthetic_probe_images

# Two images on a 2x2 token grid. Detail tokens score 0.9, 0.6 (image 0) and 0.8 (image 1); flat tokens 0.2, 0.6
# (image 0) and 0.1, 0.3, 0.7 (image 1).
PROBS = np.array([[[0.9, 0.2], [0.6, 0.6]], [[0.1, 0.8], [0.3, 0.7]]])
MASKS = np.array([[[True, False], [True, False]], [[False, True], [False, False]]])


class FixedRouter(nn.Module):
    """Routes every input the same way whatever the timestep (p given, kept = p > 0.5); remembers its inputs."""

    def __init__(self, probs: np.ndarray):
        super().__init__()
        self.probs = torch.tensor(probs, dtype=torch.float32)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y, return_routing=False):
        self.inputs.append((x.clone(), t.clone()))
        b, h, w = self.probs.shape
        flat = self.probs.reshape(b, h * w)
        return x, Routing(probs=flat, router_mask=flat > 0.5, mask=flat > 0.5, grid_size=(h, w))


def _images(masks: np.ndarray = MASKS) -> ProbeImages:
    x0 = torch.linspace(-1, 1, len(masks) * 3 * 4 * 4).reshape(len(masks), 3, 4, 4)
    return ProbeImages(x0=x0, labels=torch.zeros(len(masks), dtype=torch.long), masks=masks, batch=None)


def _pairwise_auc(probs: np.ndarray, masks: np.ndarray) -> float:
    """P(a detail token outscores a flat one), ties counting one half, by counting every pair."""
    pos, neg = probs[masks], probs[~masks]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_probe_timesteps_are_distinct_and_run_noisy_to_clean():
    assert probe_timesteps(1000) == [950, 750, 500, 250, 50]
    assert probe_timesteps(10) == [9, 8, 5, 2, 0]  # 0.95 * 10 rounds to 10, clamped to T - 1
    assert probe_timesteps(2) == [1, 0]


def test_auc_kept_share_and_intervals_on_a_hand_made_case():
    diffusion = create_diffusion(num_timesteps=100)
    result = probe_router(FixedRouter(PROBS), diffusion, _images(), [90, 20], seed=3)
    # 15 (detail, flat) pairs: 0.9 and 0.8 beat all 5 flat tokens, 0.6 beats 3 and ties 1: 13.5 / 15.
    assert _pairwise_auc(PROBS, MASKS) == pytest.approx(0.9)
    assert result.auc == pytest.approx([0.9, 0.9]) and result.clean_auc == pytest.approx(0.9)
    assert result.mean_auc == pytest.approx(0.9)
    assert result.kept == [5 / 8, 5 / 8]  # 0.9, 0.6, 0.6, 0.8, 0.7 are above 0.5
    assert result.kept_on_detail == [3 / 5, 3 / 5]  # of those, 0.9, 0.6 (image 0) and 0.8 lie on detail
    assert result.detail_share == 3 / 8 and result.num_images == 2 and result.timesteps == [90, 20]
    # A resample of images holds image 0 only (AUC 3.5 / 4), image 1 only (AUC 1) or both (0.9).
    assert _pairwise_auc(PROBS[0], MASKS[0]) == 0.875 and _pairwise_auc(PROBS[1], MASKS[1]) == 1.0
    assert result.auc_low == [0.875, 0.875] and result.auc_high == [1.0, 1.0]
    assert (result.mean_low, result.mean_high) == (0.875, 1.0)
    assert result.verdict == "boundaries follow detail"
    assert [p.shape for p in result.probs] == [(2, 2, 2)] * 2


@pytest.mark.parametrize("flip,verdict", [(True, "boundaries avoid detail (below chance)"),
                                          (None, "no evidence either way (the interval includes 0.5)")])
def test_verdicts(flip, verdict):
    probs = 1.0 - MASKS.astype(float) * 0.8 if flip else np.full(MASKS.shape, 0.4)
    result = probe_router(FixedRouter(probs), create_diffusion(num_timesteps=100), _images(), [5], seed=0)
    assert result.auc == [0.0 if flip else 0.5]
    assert result.verdict == verdict


def test_noise_depends_only_on_the_seed_and_the_timestep():
    diffusion = create_diffusion(num_timesteps=100)
    both, alone = FixedRouter(PROBS), FixedRouter(PROBS)
    probe_router(both, diffusion, _images(), [90, 20], seed=3)
    probe_router(alone, diffusion, _images(), [20], seed=3)
    (_, t90), (x20, t20) = both.inputs
    assert torch.equal(x20, alone.inputs[0][0]) and t20.tolist() == [20, 20] and t90.tolist() == [90, 90]
    other = FixedRouter(PROBS)
    probe_router(other, diffusion, _images(), [20], seed=4)
    assert not torch.equal(other.inputs[0][0], x20)


def test_synthetic_images_pool_detail_to_the_token_grid():
    images = synthetic_probe_images(np.arange(100, 106), seed=1, image_size=16, num_classes=10, model_classes=3,
                                    grid_size=8)
    pixels = images.batch
    assert images.x0.shape == (6, 3, 16, 16) and float(images.x0.min()) >= -1 and float(images.x0.max()) <= 1
    assert torch.equal(images.x0[0, :, 0, 0] * 127.5 + 127.5, torch.tensor(pixels.images[0, 0, 0], dtype=torch.float))
    assert images.labels.tolist() == [int(v) % 3 for v in pixels.labels]
    # A token is detail when any pixel of its 2x2 patch is.
    np.testing.assert_array_equal(images.masks, pixels.masks.reshape(6, 8, 2, 8, 2).any(axis=(2, 4)))


def test_a_real_dcdit_on_synthetic_images():
    torch.manual_seed(0)
    model = dcdit.create_model("DC-DiT-S", depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=4,
                               in_channels=3).eval()
    images = synthetic_probe_images(np.arange(100, 106), seed=1, image_size=8, num_classes=4, model_classes=4,
                                    grid_size=8)
    np.testing.assert_array_equal(images.masks, images.batch.masks)  # one pixel per token
    result = probe_router(model, create_diffusion(num_timesteps=100), images, probe_timesteps(100), seed=0)
    assert result.timesteps == [95, 75, 50, 25, 5] and len(result.auc) == 5
    for probs, kept, auc in zip(result.probs, result.kept, result.auc):
        assert probs.shape == (6, 8, 8) and probs.min() >= 0 and probs.max() <= 1
        assert kept == pytest.approx(float((probs > 0.5).mean()))  # no tail drop: kept = p > 0.5
        assert auc == pytest.approx(_pairwise_auc(probs, images.masks))
