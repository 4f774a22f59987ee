"""Classifier-free guidance wrapper: combination rule, DiT's 3-channel legacy, Lite-CFG's per-branch tail drop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcdit.diffusion import LITE_CFG, Guidance, cfg_model_fn, create_diffusion, ddpm_sample
from dcdit.errors import DCDiTError

NULL = 10


class RecordingDenoiser(nn.Module):
    """A test double for the denoiser: a fixed per-sample function of (x, t, y) that records each call."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, x, t, y, **kwargs):
        self.calls.append({"batch": x.shape[0], "t": t.clone(), "y": y.clone(), **kwargs})
        label = y.to(x.dtype).view(-1, 1, 1, 1)
        step = t.to(x.dtype).view(-1, 1, 1, 1)
        channel = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
        eps = x * (1 + 0.1 * label) + 0.01 * step + channel
        var = torch.tanh(0.05 * label * x + channel)
        return torch.cat([eps, var], dim=1)


def branches(model, x, t, y):
    """Conditional and unconditional outputs from two separate direct calls."""
    return model(x, t, y), model(x, t, torch.full_like(y, NULL))


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 2, generator=gen)
    return x, torch.tensor([5, 7, 9]), torch.tensor([1, 2, 3])


def test_scale_one_is_conditional(inputs):
    x, t, y = inputs
    model = RecordingDenoiser()
    cond, _ = branches(model, x, t, y)
    torch.testing.assert_close(cfg_model_fn(model, 1.0, NULL)(x, t, y), cond)


def test_guidance_combines_eps_in_one_batched_call(inputs):
    """eps_u + s (eps_c - eps_u) on all eps channels, variance from the conditional branch, one 2B call."""
    x, t, y = inputs
    model = RecordingDenoiser()
    cond, uncond = branches(model, x, t, y)
    model.calls.clear()
    out = cfg_model_fn(model, 4.0, NULL)(x, t, y)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 6
    assert model.calls[0]["y"].tolist() == [1, 2, 3, NULL, NULL, NULL]
    assert model.calls[0]["t"].tolist() == [5, 7, 9, 5, 7, 9]
    assert "tail_drop" not in model.calls[0]  # a DiT takes no tail_drop
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])


def test_legacy_three_channel_guidance(inputs):
    """DiT legacy: only eps channels 0-2 are guided; eps channel 3 and the variance come from the cond branch."""
    x, t, y = inputs
    model = RecordingDenoiser()
    cond, uncond = branches(model, x, t, y)
    out = cfg_model_fn(model, 4.0, NULL, guided_channels=3)(x, t, y)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])
    assert (out[:, 3] - uncond[:, 3]).abs().max() > 1e-3  # the test can tell the branches apart


def test_lite_cfg_passes_per_sample_tail_drop(inputs):
    x, t, y = inputs
    model = RecordingDenoiser()
    assert LITE_CFG.scale == 1.25 and LITE_CFG.tail_drop == (0.0, 0.9)
    LITE_CFG.wrap(model, NULL)(x, t, y)
    (call,) = model.calls
    torch.testing.assert_close(call["tail_drop"], torch.tensor([0.0] * 3 + [0.9] * 3))
    with pytest.raises(DCDiTError, match="tail_drop"):
        LITE_CFG.wrap(model, NULL)(x, t, y, tail_drop=0.5)


def test_guided_sampling_runs_with_original_batch_size():
    """The wrapper plugs into a sampler unchanged and returns B samples, not 2B."""
    model = RecordingDenoiser()
    diffusion = create_diffusion("5", num_timesteps=50)
    guided = Guidance(scale=1.5, guided_channels=3, tail_drop=(0.0, 0.9)).wrap(model, NULL)
    sample = ddpm_sample(diffusion, guided, (2, 4, 2, 2), torch.tensor([1, 2]),
                         generator=torch.Generator().manual_seed(0))
    assert sample.shape == (2, 4, 2, 2) and torch.isfinite(sample).all()
    assert len(model.calls) == 5 and all(c["batch"] == 4 for c in model.calls)
