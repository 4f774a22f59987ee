"""The synthetic dataset: determinism, detail masks that cover the detail, distinct classes, AUC, speed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dcdit.data.synthetic import CLASS_NAMES, SyntheticDataset, detail_auc, mask_to_tokens, render
from dcdit.errors import DCDiTError


def high_pass(images: np.ndarray) -> np.ndarray:
    """|image - 3x3 box blur| summed over channels (edge-replicated borders): where the image has fine detail."""
    x = images.astype(np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    blur = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return np.abs(x - blur).sum(-1)


def test_same_seed_and_index_give_the_same_sample_in_any_batch():
    full = render(np.arange(64), seed=3)
    again = render(np.arange(64), seed=3)
    part = render([40, 7, 13], seed=3)
    np.testing.assert_array_equal(full.images, again.images)
    np.testing.assert_array_equal(part.images, full.images[[40, 7, 13]])
    np.testing.assert_array_equal(part.masks, full.masks[[40, 7, 13]])
    np.testing.assert_array_equal(full.labels, np.arange(64) % 10)
    other = render(np.arange(64), seed=4)
    assert (other.images != full.images).mean() > 0.5  # another seed is another dataset


def test_shapes_dtypes_and_other_sizes():
    for size in (32, 64, 24):
        b = render(np.arange(12), image_size=size, num_classes=12)
        assert b.images.shape == (12, size, size, 3) and b.images.dtype == np.uint8
        assert b.masks.shape == (12, size, size) and b.masks.dtype == bool
        assert b.labels.dtype == np.int64
    with pytest.raises(DCDiTError, match="num_classes"):
        render([0], num_classes=len(CLASS_NAMES) + 1)


def test_mask_covers_the_detail_and_background_is_smooth():
    b = render(np.arange(400), seed=1)
    energy = high_pass(b.images)
    inside, outside = energy[b.masks].mean(), energy[~b.masks].mean()
    assert inside > 25 * outside, (inside, outside)
    # Nearly all detail energy sits in the mask, and every class has a real object and a real background.
    assert energy[b.masks].sum() / energy.sum() > 0.97
    for cls in range(10):
        frac = b.masks[b.labels == cls].mean()
        assert 0.08 < frac < 0.7, (CLASS_NAMES[cls], frac)
    # Inside the object the texture is fine: most mask pixels are within reach of an edge.
    assert (energy[b.masks] > 5).mean() > 0.6


def test_classes_are_distinct():
    """A nearest-centroid classifier on crude, rotation-invariant features separates the classes."""

    def features(batch):
        m = batch.masks[..., None]
        colour = (batch.images * m).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1)
        hist = np.stack([np.histogram(img[msk].ravel(), bins=8, range=(0, 256))[0] / max(msk.sum(), 1)
                         for img, msk in zip(batch.images, batch.masks)])
        return np.concatenate([colour / 64.0, hist, batch.masks.mean((1, 2))[:, None] * 4], axis=1)

    train, test = render(np.arange(500), seed=0), render(np.arange(500), seed=1)
    f_train, f_test = features(train), features(test)
    centroids = np.stack([f_train[train.labels == c].mean(0) for c in range(10)])
    pred = np.argmin(((f_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == test.labels).mean() > 0.9


def test_dataset_is_map_style_in_minus_one_to_one():
    ds = SyntheticDataset(100, seed=2)
    x, y = ds[17]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 7
    assert x.min() >= -1 and x.max() <= 1
    images, labels = ds.read([17])
    torch.testing.assert_close(x, torch.from_numpy(images[0]).permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(IndexError):
        ds.read([100])
    assert len(ds) == 100 and ds.class_names == list(CLASS_NAMES[:10])


def test_mask_to_tokens_numpy_and_torch():
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[0, :2, :2] = True  # fills patch (0, 0) of sample 0
    mask[1, 0, 7] = True  # one pixel of patch (0, 3) of sample 1
    tokens = mask_to_tokens(mask, 2)
    assert tokens.shape == (2, 4, 4)
    assert tokens[0, 0, 0] == 1.0 and tokens[1, 0, 3] == 0.25 and tokens.sum() == 1.25
    torch.testing.assert_close(mask_to_tokens(torch.from_numpy(mask), 2), torch.from_numpy(tokens).float())
    with pytest.raises(DCDiTError, match="divisible"):
        mask_to_tokens(mask, 3)


def brute_force_auc(scores: np.ndarray, mask: np.ndarray) -> float:
    pos, neg = scores[mask], scores[~mask]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("levels", [3, 7, 1000])
def test_detail_auc_matches_brute_force_with_ties(levels):
    rng = np.random.default_rng(levels)
    for _ in range(5):
        mask = rng.random((3, 6, 5)) < 0.4
        scores = rng.integers(0, levels, size=mask.shape) + 0.7 * mask  # informative, with many ties
        assert detail_auc(scores, mask) == pytest.approx(brute_force_auc(scores.ravel(), mask.ravel()), abs=1e-12)
    assert detail_auc(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([False, True, False])) == 1.0
    assert detail_auc([0.9, 0.1], [False, True]) == 0.0
    assert detail_auc([0.3, 0.3, 0.3], [True, False, True]) == 0.5
    assert np.isnan(detail_auc([0.1, 0.2], [True, True]))


def test_mask_is_a_good_detail_predictor_at_token_level():
    """The intended use: token-level detail (here the high-pass energy per patch) scored against the mask."""
    b = render(np.arange(50), seed=5)
    energy_tokens = mask_to_tokens(high_pass(b.images) > 5, 2)
    assert detail_auc(energy_tokens, mask_to_tokens(b.masks, 2) > 0.5) > 0.9
