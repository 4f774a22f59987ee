"""Sample generation (dcdit.generate): labels i mod C, per-sample seeds that make a sample independent of its batch,
guidance settings (CFG, Lite-CFG, tail drop), and equality with a direct call of the samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcdit.config import ModelConfig
from dcdit.diffusion import Guidance, create_diffusion, ddim_sample, ddpm_sample, per_sample_generators
from dcdit.generate import SamplingPlan, generate, quantize, sample_labels, sample_seed
from dcdit.models import build_model

SHAPE = (3, 8, 8)
FAMILY_FIELDS = {"dit": {"patch_size": 2},
                 "dcdit": {"scaffold_width": 16, "encoder_blocks": 1, "decoder_blocks": 1, "downsample_factor": 2}}


def tiny(arch: str) -> torch.nn.Module:
    """A tiny model whose zero-initialised output layers are perturbed, so samples depend on weights and labels."""
    fields = {"arch": arch, "depth": 1, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 3,
              "num_classes": 4, **FAMILY_FIELDS[arch]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**fields))
        for name, p in model.named_parameters():
            if "final_layer" in name or "adaLN" in name:
                p.data.normal_(0, 0.05)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def dcdit_model() -> torch.nn.Module:
    return tiny("dcdit")


def plan(**changes) -> SamplingPlan:
    fields = dict(sampler="ddim", steps=2, num_timesteps=1000, learn_sigma=True, cfg_scale=1.0, lite_cfg=False,
                  rho=None, null_class=4, seed=7, num_classes=4)
    return SamplingPlan(**{**fields, **changes})


def test_labels_are_i_mod_num_classes():
    assert sample_labels(np.arange(6), 4).tolist() == [0, 1, 2, 3, 0, 1]
    assert sample_labels(np.array([9, 4, 13]), 4).tolist() == [1, 0, 1]
    assert sample_labels(np.arange(3), 4).dtype == np.int64


def test_quantize_rounds_to_nearest_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    out = quantize(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3, 3)
    # 127.5 x + 128 truncated: -1 -> 0.5 -> 0, 0 -> 128, 0.5 -> 191.75 -> 191, 1 -> 255.5 -> 255 (clamped)
    assert out[0, :, :, 0].ravel().tolist() == [0, 0, 128, 191, 255, 255]


@pytest.mark.parametrize("changes", [{}, {"rho": 0.5}, {"cfg_scale": 1.5, "rho": 0.25}, {"lite_cfg": True,
                                                                                         "cfg_scale": 1.25}])
def test_a_sample_does_not_depend_on_its_batch(dcdit_model, changes):
    p = plan(**changes)
    whole, _ = generate(dcdit_model, p, np.arange(4), SHAPE, device=torch.device("cpu"))
    halves = [generate(dcdit_model, p, np.arange(a, a + 2), SHAPE, device=torch.device("cpu"))[0] for a in (2, 0)]
    assert np.array_equal(np.concatenate(halves[::-1]), whole)
    # Sample 2 generated alongside samples 0 and 1 (other seeds, other labels) is the same image.
    mixed, _ = generate(dcdit_model, p, np.array([2, 0]), SHAPE, device=torch.device("cpu"))
    assert np.array_equal(mixed, whole[[2, 0]])
    assert not np.array_equal(whole[0], whole[1])


def test_other_seed_gives_other_samples(dcdit_model):
    a, _ = generate(dcdit_model, plan(), np.arange(2), SHAPE, device=torch.device("cpu"))
    b, _ = generate(dcdit_model, plan(seed=8), np.arange(2), SHAPE, device=torch.device("cpu"))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generate_equals_a_direct_sampler_call(sampler):
    model = tiny("dit")
    indices = np.array([5, 6, 7])
    p = plan(sampler=sampler, cfg_scale=1.5)
    ours, flops = generate(model, p, indices, SHAPE, device=torch.device("cpu"))
    assert flops is None
    respacing = "ddim2" if sampler == "ddim" else "2"
    run = ddim_sample if sampler == "ddim" else ddpm_sample
    direct = run(create_diffusion(respacing, num_timesteps=1000, learn_sigma=True),
                 Guidance(scale=1.5, guided_channels=3).wrap(model, 4), (3, *SHAPE),
                 torch.tensor([1, 2, 3]), generator=per_sample_generators([sample_seed(7, i) for i in (5, 6, 7)]))
    assert np.array_equal(ours, quantize(direct))


def test_guidance_settings():
    assert plan().guidance() is None and plan().forwards_per_step() == 1
    assert plan(rho=0.3).guidance() is None  # tail drop without guidance goes to the model itself
    assert plan(cfg_scale=1.5).guidance() == Guidance(scale=1.5, guided_channels=3, tail_drop=None)
    assert plan(cfg_scale=1.5, rho=0.3).guidance().tail_drop == (0.3, 0.3)
    lite = plan(lite_cfg=True, cfg_scale=1.25)
    assert lite.guidance() == Guidance(scale=1.25, guided_channels=3, tail_drop=(0.0, 0.9))
    assert lite.forwards_per_step() == 2
    assert plan(lite_cfg=True, cfg_scale=1.25, rho=0.95).guidance().tail_drop == (0.95, 0.95)


def test_counted_flops_shrink_with_tail_drop(dcdit_model):
    _, full = generate(dcdit_model, plan(), np.arange(2), SHAPE, device=torch.device("cpu"), count_flops=True)
    _, dropped = generate(dcdit_model, plan(rho=0.5), np.arange(2), SHAPE, device=torch.device("cpu"),
                          count_flops=True)
    assert 0 < dropped < full
