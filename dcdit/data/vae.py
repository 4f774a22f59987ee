"""The image side of latent diffusion: ADM centre crop, and diffusers' AutoencoderKL encode/decode.

Latents follow the sd-vae-ft-ema/mse convention, `latent_dist.sample() * 0.18215`, with the Gaussian noise drawn
from a per-sample seed so that re-running a preparation (with any batching or device) gives equal latents.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dcdit.errors import DCDiTError

LATENT_SCALE = 0.18215
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX filtering while the short side is >= 2x the target, resize the short side
    to `image_size` with BICUBIC, then cut the central square. Returns uint8 [image_size, image_size, 3]."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def sample_seed(seed: int, *keys: int) -> int:
    """The seed of one sample's noise, a function of (seed, *keys) alone, e.g. (seed, index) for a latent or an
    evaluation sample, (seed, step, index) for a training sample: independent of batching and worker count."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _looks_like_path(name: str) -> bool:
    """Local when it exists, is absolute or relative-looking, or cannot be a hub id ('org/name' or 'name')."""
    return (os.path.exists(os.path.expanduser(name)) or os.path.isabs(name) or name.startswith((".", "~"))
            or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is None)


def _resolve(name_or_dir: str, subfolder: str | None) -> tuple[str, str | None]:
    """(what to pass to from_pretrained, subfolder); a local directory must exist and hold a config.json."""
    if not _looks_like_path(name_or_dir):
        return name_or_dir, subfolder
    path = os.path.expanduser(name_or_dir)
    if not os.path.isdir(path):
        raise DCDiTError(f"no VAE directory at {name_or_dir}: pass a directory saved with "
                         f"`AutoencoderKL.save_pretrained`, or a hub name such as {DEFAULT_VAE}")
    if subfolder is None and not os.path.exists(os.path.join(path, "config.json")) \
            and os.path.exists(os.path.join(path, "vae", "config.json")):
        subfolder = "vae"  # a whole pipeline directory
    if not os.path.exists(os.path.join(path, subfolder or "", "config.json")):
        raise DCDiTError(f"{name_or_dir} has no config.json: it is not a diffusers AutoencoderKL directory "
                         f"(download one with `huggingface-cli download {DEFAULT_VAE} --local-dir DIR`)")
    return path, subfolder


def _load_error(name_or_dir: str, err: BaseException) -> DCDiTError:
    if _looks_like_path(name_or_dir):
        return DCDiTError(f"cannot load the VAE in {name_or_dir}: {' '.join(str(err).split())[:200]}")
    usual = "" if name_or_dir == DEFAULT_VAE else f" (the usual choice is {DEFAULT_VAE})"
    return DCDiTError(
        f"cannot load VAE '{name_or_dir}' (not in the Hugging Face cache and the hub is unreachable): on a machine "
        f"with internet run `huggingface-cli download {name_or_dir} --local-dir DIR`{usual}, copy DIR here and "
        "pass --vae DIR")


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DCDiTError("the VAE needs the `diffusers` package: pip install diffusers") from None
    return AutoencoderKL


def check_vae(name_or_dir: str, *, subfolder: str | None = None) -> dict:
    """The VAE's config, fetched without its weights: fails fast (DCDiTError) when the model is unavailable."""
    path, subfolder = _resolve(name_or_dir, subfolder)
    try:
        config = _autoencoder_class().load_config(path, **({"subfolder": subfolder} if subfolder else {}))
    except (OSError, ValueError) as err:
        raise _load_error(name_or_dir, err) from None
    return dict(config)


def load_vae(name_or_dir: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             subfolder: str | None = None):
    """diffusers `AutoencoderKL` from a local directory or a hub name (e.g. 'stabilityai/sd-vae-ft-ema').

    A local directory may hold the VAE itself or a pipeline with a `vae/` subfolder. A hub name needs either
    internet or the Hugging Face cache; when neither has it, the DCDiTError says what to download and where.
    """
    path, subfolder = _resolve(name_or_dir, subfolder)
    try:
        vae = _autoencoder_class().from_pretrained(path, torch_dtype=dtype,
                                                   **({"subfolder": subfolder} if subfolder else {}))
    except (OSError, ValueError) as err:
        raise _load_error(name_or_dir, err) from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor, seeds: Sequence[int], *, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Images float [B, 3, H, W] in [-1, 1] -> latents float32 [B, C, H/f, W/f] = (mean + std * eps) * scale.

    eps for sample i comes from a CPU generator seeded with seeds[i]: the same image and seed give the same
    latent in any batch, on any device (up to the encoder's float arithmetic).
    """
    if len(seeds) != images.shape[0]:
        raise DCDiTError(f"encode: {images.shape[0]} images but {len(seeds)} seeds")
    param = next(vae.parameters())
    dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
    shape = tuple(dist.mean.shape[1:])
    eps = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    z = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
    return (z * scale).float()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, *, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Latents (as stored, i.e. scaled) -> images float [B, 3, H, W], roughly in [-1, 1]."""
    param = next(vae.parameters())
    return vae.decode(latents.to(param.device, param.dtype) / scale).sample.float()
