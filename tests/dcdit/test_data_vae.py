"""The VAE side: ADM centre crop, deterministic per-sample latents, clear errors for missing models."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit.data.reader import to_model_input
from dcdit.data.synthetic import render
from dcdit.data.vae import LATENT_SCALE, center_crop_arr, check_vae, decode, encode, load_vae, sample_seed
from dcdit.errors import DCDiTError


def tiny_vae_dir(path) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        sample_size=32, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return tiny_vae_dir(tmp_path_factory.mktemp("tiny-vae"))


def test_center_crop_follows_adm():
    # A 300x200 image: one BOX halving (200 >= 2*64), BICUBIC so the short side is 64, then the central 64x64.
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    half = Image.fromarray(arr).resize((150, 100), resample=Image.BOX)
    resized = np.asarray(half.resize((96, 64), resample=Image.BICUBIC))
    np.testing.assert_array_equal(out, resized[:, 16:80])
    # Smaller than the target: upscaled, never padded; greyscale becomes RGB.
    small = center_crop_arr(Image.fromarray(arr[:20, :30, 0]), 32)
    assert small.shape == (32, 32, 3)


def test_center_crop_keeps_the_centre():
    arr = np.zeros((400, 600, 3), dtype=np.uint8)
    arr[150:250, 250:350] = 255  # a white square in the middle
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out[16, 16].min() == 255 and out[0, 0].max() == 0 and out[16, 0].max() == 0


def test_latents_are_deterministic_per_sample_in_any_batch(tiny_vae):
    vae = load_vae(tiny_vae)
    images = to_model_input(render(np.arange(6), seed=0).images, "pixels")
    seeds = [sample_seed(0, i) for i in range(6)]
    together = encode(vae, images, seeds)
    assert together.shape == (6, 4, 32, 32) and together.dtype == torch.float32
    one_by_one = torch.cat([encode(vae, images[i:i + 1], seeds[i:i + 1]) for i in (0, 1, 2, 3, 4, 5)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)
    # The seed matters (it is a sample, not the mean), and the scale is the sd-vae convention.
    other = encode(vae, images, [s + 1 for s in seeds])
    assert (other - together).abs().max() > 1e-3
    dist = vae.encode(images).latent_dist
    torch.testing.assert_close(together / LATENT_SCALE, dist.mean + dist.std * torch.stack(
        [torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]))
    assert decode(vae, together).shape == (6, 3, 32, 32)
    assert sample_seed(0, 5) == sample_seed(0, 5) != sample_seed(1, 5)


def test_missing_local_vae_is_a_clear_error(tmp_path):
    with pytest.raises(DCDiTError, match="no VAE directory at .*save_pretrained"):
        load_vae(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DCDiTError, match="no config.json.*huggingface-cli download stabilityai/sd-vae-ft-ema"):
        check_vae(str(tmp_path / "empty"))


def test_a_pipeline_directory_with_a_vae_subfolder_works(tmp_path, tiny_vae):
    import shutil

    shutil.copytree(tiny_vae, tmp_path / "pipe" / "vae")
    assert check_vae(str(tmp_path / "pipe"))["latent_channels"] == 4


def test_missing_hub_model_offline_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    expected = r"huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR.*--vae DIR"
    with pytest.raises(DCDiTError, match=expected):
        check_vae("stabilityai/sd-vae-ft-ema")
    assert time.perf_counter() - start < 20
