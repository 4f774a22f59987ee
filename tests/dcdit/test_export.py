"""Exports: a dcdit export directory read back by `from_pretrained` gives bit-identical outputs (DiT and DC-DiT);
the diffusers export runs in diffusers' own DiTPipeline and samples what our DDIM sampler samples; refusals."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch

import dcdit
from dcdit.data.vae import decode
from dcdit.diffusion import create_diffusion, ddim_sample, per_sample_generators
from dcdit.errors import DCDiTError
from dcdit.export import export_diffusers, load_pretrained, save_pretrained
from dcdit.models import create_model

SIDE, CLASSES, T = 8, 10, 1000


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (adaLN-Zero's zero init would make outputs trivially equal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return _randomised(create_model("DiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=SIDE,
                                    num_classes=CLASSES), 1)


@pytest.fixture(scope="module")
def dc_dit():
    torch.manual_seed(0)
    model = create_model("DC-DiT-S", depth=2, hidden_size=32, num_heads=2, input_size=SIDE, in_channels=3,
                         num_classes=CLASSES, scaffold_width=16, encoder_blocks=1, decoder_blocks=1)
    return _randomised(model, 2)


def _inputs(channels: int):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(3, channels, SIDE, SIDE, generator=gen), torch.tensor([0, 421, 999]),
            torch.tensor([0, 7, CLASSES]))  # CLASSES is the null class


@pytest.mark.parametrize("which", ["dit", "dc_dit"])
def test_round_trip_is_bit_identical(which, request, tmp_path):
    model = request.getfixturevalue(which)
    save_pretrained(tmp_path / "out", config=model.config, weights=model.state_dict(), num_timesteps=T,
                    vae="stabilityai/sd-vae-ft-ema" if which == "dit" else None,
                    sampling={"sampler": "ddim", "steps": 50}, source={"checkpoint": "x", "step": 7})
    loaded = dcdit.from_pretrained(tmp_path / "out")
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    x, t, y = _inputs(model.config.in_channels)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    full = load_pretrained(tmp_path / "out")
    assert (full.num_timesteps, full.sampling["sampler"], full.sampling["steps"], full.sampling["cfg_scale"]) == \
        (T, "ddim", 50, 1.0)
    record = json.loads((tmp_path / "out" / "dcdit_config.json").read_text())
    assert record["arch"] == model.config.arch and record["format_version"] == 1
    assert record["family"] == ("DiT" if which == "dit" else "DC-DiT")
    assert (full.vae, full.latent_scale) == (("stabilityai/sd-vae-ft-ema", 0.18215) if which == "dit"
                                             else (None, None))


def test_refusals_leave_nothing_half_written(dit, dc_dit, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DCDiTError, match="already exists and is not an empty directory"):
        save_pretrained(tmp_path / "full", config=dit.config, weights=dit.state_dict(), num_timesteps=T)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    with pytest.raises(DCDiTError, match="do not fit the DiT"):
        save_pretrained(tmp_path / "bad", config=dit.config, weights=dc_dit.state_dict(), num_timesteps=T)
    with pytest.raises(DCDiTError, match=r"^a DC-DiT checkpoint cannot be exported to diffusers: .*router"):
        export_diffusers(tmp_path / "dc", config=dc_dit.config, weights=dc_dit.state_dict(), num_timesteps=T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    with pytest.raises(DCDiTError, match="not a dcdit export"):
        dcdit.from_pretrained(tmp_path / "full")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "dcdit_config.json").write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "dcdit_config.json").write_text('{"format": "other"}'), "not a dcdit export config"),
    (lambda d: _edit(d, format_version=2), "newer than this dcdit"),
    (lambda d: _edit(d, num_classes="ten"), "'num_classes' is missing or not an int"),
    (lambda d: _edit(d, diffusion={"num_timesteps": 0}), "num_timesteps must be a positive int"),
    (lambda d: _edit(d, model={**_record(d)["model"], "depth": 3}), "do not fit the DiT"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 9), "not a readable safetensors file"),
])
def test_damaged_exports_are_one_line_errors(dit, tmp_path, damage, message):
    save_pretrained(tmp_path / "out", config=dit.config, weights=dit.state_dict(), num_timesteps=T)
    damage(tmp_path / "out")
    with pytest.raises(DCDiTError, match=message) as err:
        dcdit.from_pretrained(tmp_path / "out")
    assert "\n" not in str(err.value)


def _record(directory) -> dict:
    return json.loads((directory / "dcdit_config.json").read_text())


def _edit(directory, **changes) -> None:
    (directory / "dcdit_config.json").write_text(json.dumps({**_record(directory), **changes}))


def _tiny_vae():
    torch.manual_seed(4)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                                   norm_num_groups=4, sample_size=SIDE).eval()


def _dit_timestep_features(pipe) -> None:
    """diffusers' timestep features divide the frequency exponent by (half - 1) (downscale_freq_shift=1), the
    original DiT's by half; no config key sets it, so the test sets the attribute (it holds no weights)."""
    for block in pipe.transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


def test_diffusers_pipeline_samples_what_we_sample(dit, tmp_path):
    """diffusers' DiTPipeline on the exported directory against our DDIM sampler on our DiT.

    Settings under which diffusers computes what DiT computes: the exported norm_eps=1e-6 (the original's
    LayerNorm eps), downscale_freq_shift=0 on the timestep features (set below), the exported DDIM scheduler
    (our linear betas, clip_sample off, alpha_prod at t<0 = 1, 'leading' spacing: 0, 250, 500, 750 for 4 of 1000
    steps, the same steps as our 'ddim4'), no guidance (DiTPipeline's null class is hard-wired to 1000 and it
    guides all latent channels, DiT the first three), and one generator per sample (both draw each sample's x_T
    from its own generator). diffusers keeps its betas in float32, we in float64: equal within fp32 tolerance.
    """
    export_diffusers(tmp_path / "hf", config=dit.config, weights=dit.state_dict(), num_timesteps=T)
    vae = _tiny_vae()
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "hf", vae=vae)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    _dit_timestep_features(pipe)
    labels, seeds = [3, 7, 0], [11, 12, 13]
    theirs = pipe(class_labels=labels, guidance_scale=1.0, generator=per_sample_generators(seeds),
                  num_inference_steps=4, output_type="pt").images

    diffusion = create_diffusion("ddim4", num_timesteps=T, learn_sigma=True)
    latents = ddim_sample(diffusion, dit, (3, 4, SIDE, SIDE), torch.tensor(labels),
                          generator=per_sample_generators(seeds))
    ours = (decode(vae, latents) / 2 + 0.5).clamp(0, 1)
    assert ours.std() > 0.01  # images, not a constant
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    # Without the timestep-feature setting diffusers computes something else (the setting is what makes them equal).
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "hf", vae=vae)
    other = pipe(class_labels=labels, guidance_scale=1.0, generator=per_sample_generators(seeds),
                 num_inference_steps=4, output_type="pt").images
    assert not np.allclose(other.numpy(), ours.numpy(), rtol=1e-4, atol=1e-5)


def test_diffusers_export_reads_back_into_our_dit(dit, tmp_path):
    """The diffusers directory loads through dcdit.load_dit (the mapping both ways) to the same function."""
    export_diffusers(tmp_path / "hf", config=dit.config, weights=dit.state_dict(), num_timesteps=T)
    back = dcdit.load_dit(tmp_path / "hf")
    x, t, y = _inputs(4)
    with torch.no_grad():
        assert torch.equal(back(x, t, y), dit(x, t, y))
