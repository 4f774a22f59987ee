"""viz: PNGs that decode, are not blank, and have as many panels as asked; sample grids are pixel-exact; the
routing recorder collects one map per sampling call of a real (tiny) DC-DiT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit.config import ModelConfig
from dcdit.diffusion import create_diffusion, ddim_sample
from dcdit.models import DCDiT
from dcdit.viz import RoutingRecorder, boundary_maps, kept_fraction_curve, sample_grid


def read(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def probs(steps: int, batch: int, side: int = 8) -> torch.Tensor:
    return torch.rand(steps, batch, side, side, generator=torch.Generator().manual_seed(steps * 10 + batch))


def test_boundary_maps_panels_scale_with_steps_and_samples(tmp_path):
    base = read(boundary_maps(probs(3, 2), [999, 500, 0], tmp_path / "a.png", panel_pixels=64))
    assert base.std() > 0
    wider = read(boundary_maps(probs(5, 2), [999, 750, 500, 250, 0], tmp_path / "b.png", panel_pixels=64))
    taller = read(boundary_maps(probs(3, 4), [999, 500, 0], tmp_path / "c.png", panel_pixels=64))
    # 8x8 maps at 64 px are 8x upsampled, so each panel is 64 px plus a 4 px gap: two more columns add 136 px.
    assert abs(wider.shape[1] - base.shape[1] - 2 * 68) <= 1 and wider.shape[0] == base.shape[0]
    assert taller.shape[0] - base.shape[0] >= 2 * 68 and taller.shape[1] == base.shape[1]


def test_boundary_maps_over_images_and_from_flat_probs(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    flat = probs(3, 2).reshape(3, 2, 64)  # (S, B, L), as Routing.probs stacks
    plain = read(boundary_maps(flat, torch.tensor([900, 400, 10]), tmp_path / "plain.png"))
    over = read(boundary_maps(flat, [900, 400, 10], tmp_path / "over.png", images=images, labels=["a", "b"]))
    assert over.shape == plain.shape and not np.array_equal(over, plain)  # the images show through
    float_images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert read(boundary_maps(flat, [900, 400, 10], tmp_path / "f.png", images=float_images)).std() > 0
    with pytest.raises(ValueError, match="timesteps"):
        boundary_maps(flat, [1, 2], tmp_path / "bad.png")


def test_kept_fraction_curve(tmp_path):
    t = list(range(999, -1, -111))
    single = read(kept_fraction_curve(t, np.linspace(0.22, 0.45, len(t)), tmp_path / "k.png", target=0.25))
    assert single.std() > 0
    per_sample = np.random.default_rng(1).uniform(0.2, 0.5, size=(len(t), 4))
    assert read(kept_fraction_curve(t, per_sample, tmp_path / "k2.png")).std() > 0


def test_sample_grid_is_pixel_exact(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    grid = read(sample_grid(images, tmp_path / "g.png", nrow=3, padding=2))
    assert grid.shape == (2 * 8 + 3 * 2, 3 * 6 + 4 * 2, 3)
    np.testing.assert_array_equal(grid[2:10, 2:8], images[0])
    np.testing.assert_array_equal(grid[12:20, 10:16], images[4])  # row 1, column 1
    assert (grid[12:20, 18:24] == 255).all()  # the empty sixth cell is padding
    # Float NCHW in [-1, 1]: -1 -> 0, 1 -> 255.
    floats = torch.stack([-torch.ones(3, 4, 4), torch.ones(3, 4, 4)])
    pixels = read(sample_grid(floats, tmp_path / "f.png", nrow=2, padding=0))
    assert pixels.shape == (4, 8, 3)
    assert (pixels[:, :4] == 0).all() and (pixels[:, 4:] == 255).all()


def test_routing_recorder_during_sampling(tmp_path):
    torch.manual_seed(0)
    model = DCDiT(ModelConfig(arch="dcdit", depth=1, hidden_size=32, num_heads=2, input_size=8,
                              num_classes=4)).eval()
    recorder = RoutingRecorder(model)
    diffusion = create_diffusion("ddim4")
    y = torch.tensor([0, 3])
    x = ddim_sample(diffusion, recorder, (2, 4, 8, 8), y, generator=torch.Generator().manual_seed(1))
    assert x.shape == (2, 4, 8, 8)
    maps = recorder.probs_over_time()
    assert maps.shape == (4, 2, 8, 8) and len(recorder.timesteps) == 4
    assert recorder.timesteps == sorted(recorder.timesteps, reverse=True)  # noisy first
    assert ((maps >= 0) & (maps <= 1)).all() and (maps[:, :, 0, 0] == 1).all()  # first token always kept
    assert recorder.kept_fraction().shape == (4, 2)
    assert read(boundary_maps(recorder.routings, recorder.timesteps, tmp_path / "r.png")).std() > 0
