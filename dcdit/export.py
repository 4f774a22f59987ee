"""Exported models: a self-describing directory (config JSON + the EMA weights as safetensors + the diffusion,
sampler and VAE settings) that `from_pretrained` rebuilds with no YAML, and, for DiT, a diffusers `DiTPipeline`
directory (transformer + DDIM scheduler) holding the same weights under diffusers' names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcdit.config import ModelConfig, from_dict
from dcdit.data.vae import LATENT_SCALE
from dcdit.errors import DCDiTError
from dcdit.models import build_model, family_of
from dcdit.models.dit import DiT
from dcdit.pretrained import dit_to_diffusers_state_dict
from dcdit.safeload import shape_mismatch

FORMAT, FORMAT_VERSION = "dcdit-export", 1
CONFIG_FILE, WEIGHTS_FILE = "dcdit_config.json", "model.safetensors"
# What `dcdit sample` uses when neither the export nor its flags say otherwise (DiT's sample.py: 250 DDPM steps).
DEFAULT_SAMPLING = {"sampler": "ddpm", "steps": 250, "cfg_scale": 1.0, "lite_cfg": False, "tail_drop": None}


@dataclass(frozen=True)
class Exported:
    """An exported model with everything needed to sample from it."""

    model: nn.Module  # in eval mode, float32, on the requested device
    config: ModelConfig
    num_timesteps: int  # the training diffusion's T (linear betas, dcdit.diffusion.linear_beta_schedule)
    num_classes: int  # the classes it was trained on (labels 0 .. num_classes - 1)
    sampling: dict[str, Any]  # sampler, steps, cfg_scale, lite_cfg, tail_drop
    vae: str | None  # the VAE decoding its latents (hub name or directory), None for a pixel model
    latent_scale: float | None
    source: dict[str, Any]  # where it came from: checkpoint, step, run name, whether the weights are EMA


def save_pretrained(directory: str | os.PathLike, *, config: ModelConfig, weights: dict[str, torch.Tensor],
                    num_timesteps: int, num_classes: int | None = None, vae: str | None = None,
                    sampling: dict[str, Any] | None = None, source: dict[str, Any] | None = None) -> Path:
    """Write an export directory (refusing a non-empty one); it appears whole or not at all."""
    _check_weights(weights, config, "the weights to export")
    unknown = set(sampling or {}) - set(DEFAULT_SAMPLING)
    if unknown:
        raise DCDiTError(f"unknown sampling setting(s) {sorted(unknown)}; use {', '.join(DEFAULT_SAMPLING)}")
    family = family_of(config)
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": config.arch,
              "family": family.display_name, "model": dataclasses.asdict(config),
              "diffusion": {"num_timesteps": int(num_timesteps), "beta_schedule": "linear",
                            "learn_sigma": config.learn_sigma, "prediction": "epsilon"},
              "num_classes": int(num_classes or config.num_classes),
              "sampling": {**DEFAULT_SAMPLING, **(sampling or {})},
              "vae": {"name": vae, "latent_scale": LATENT_SCALE} if vae else None, "source": source or {}}
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
               for k, v in weights.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))

    return _write_whole(Path(directory), write)


def from_pretrained(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model of an export directory (`dcdit export` or `save_pretrained`), in eval mode."""
    return load_pretrained(directory, map_location=map_location).model


def load_pretrained(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Exported:
    """An export directory with its model and its diffusion, sampler and VAE settings."""
    directory = Path(directory)
    record = read_record(directory)
    from safetensors.torch import load_file

    try:
        weights = load_file(str(directory / WEIGHTS_FILE), device=str(torch.device(map_location)))
    except Exception as err:  # safetensors raises its own error type for malformed files
        raise DCDiTError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file ({err}); "
                         f"export the checkpoint again") from None
    config = from_dict(ModelConfig, record["model"])
    _check_weights(weights, config, str(directory))
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(weights, strict=True, assign=True)
    vae = record.get("vae") or {}
    return Exported(model=model.eval(), config=config, num_timesteps=int(record["diffusion"]["num_timesteps"]),
                    num_classes=int(record["num_classes"]), sampling={**DEFAULT_SAMPLING, **record["sampling"]},
                    vae=vae.get("name"), latent_scale=vae.get("latent_scale"), source=record.get("source", {}))


def is_export(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def read_record(directory: Path) -> dict[str, Any]:
    """The parsed dcdit_config.json of an export directory, its format checked."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise DCDiTError(f"{directory} is not a dcdit export: no {CONFIG_FILE} (write one with `dcdit export "
                         f"CHECKPOINT {directory}`)")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DCDiTError(f"{path} is not valid JSON ({err}); export the checkpoint again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DCDiTError(f"{path} is not a dcdit export config (format {FORMAT!r} expected)")
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise DCDiTError(f"{directory} has export format {record['format_version']}, newer than this dcdit "
                         f"({FORMAT_VERSION}); upgrade dcdit")
    for key, kind in (("model", dict), ("diffusion", dict), ("sampling", dict), ("num_classes", int)):
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise DCDiTError(f"{path}: {key!r} is missing or not a{'n int' if kind is int else ' JSON object'}; "
                             f"export the checkpoint again")
    if not isinstance(record["diffusion"].get("num_timesteps"), int) or record["diffusion"]["num_timesteps"] < 1:
        raise DCDiTError(f"{path}: diffusion.num_timesteps must be a positive int; export the checkpoint again")
    return record


# --- diffusers -------------------------------------------------------------------------------------------------------

def export_diffusers(directory: str | os.PathLike, *, config: ModelConfig, weights: dict[str, torch.Tensor],
                     num_timesteps: int) -> Path:
    """A diffusers DiTPipeline directory: transformer/ (DiTTransformer2DModel), scheduler/ (DDIM on our linear
    betas) and model_index.json; the VAE is not included (pass `vae=` to `DiTPipeline.from_pretrained`).

    norm_eps is the original DiT's 1e-6. diffusers' timestep features still differ from DiT's (their frequency
    exponent is divided by half - 1, not half; no config key sets it), so its outputs are close to ours, not equal.
    """
    family = family_of(config)
    if family.model_class is not DiT:
        raise DCDiTError(f"a {family.display_name} checkpoint cannot be exported to diffusers: DiTTransformer2DModel "
                         f"has no router, chunking or scaffold; export DiT checkpoints only (or drop --diffusers)")
    if config.mlp_ratio != 4.0:
        raise DCDiTError(f"model.mlp_ratio={config.mlp_ratio:g}: DiTTransformer2DModel's MLP is 4x wide; only "
                         f"mlp_ratio 4 models can be exported to diffusers")
    _check_weights(weights, config, "the weights to export")
    state = {k: v.detach().float().cpu() for k, v in weights.items()}
    if config.class_dropout_prob <= 0:  # diffusers always has a null-class row; this model never used one
        table = state["y_embedder.embedding_table.weight"]
        state["y_embedder.embedding_table.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
    tensors = {k: v.contiguous() for k, v in dit_to_diffusers_state_dict(state, config.depth).items()}
    version = _diffusers_version()
    transformer = {
        "_class_name": "DiTTransformer2DModel", "_diffusers_version": version,
        "num_attention_heads": config.num_heads, "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels, "out_channels": config.out_channels, "num_layers": config.depth,
        "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": config.input_size,
        "patch_size": config.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": 1e-6}
    scale = 1000.0 / num_timesteps  # dcdit.diffusion.linear_beta_schedule's betas for any T
    scheduler = {
        "_class_name": "DDIMScheduler", "_diffusers_version": version, "num_train_timesteps": int(num_timesteps),
        "beta_start": scale * 1e-4, "beta_end": scale * 0.02, "beta_schedule": "linear", "clip_sample": False,
        "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "timestep_spacing": "leading"}
    index = {"_class_name": "DiTPipeline", "_diffusers_version": version,
             "transformer": ["diffusers", "DiTTransformer2DModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": ["diffusers", "AutoencoderKL"]}
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        (tmp / "transformer").mkdir()
        (tmp / "scheduler").mkdir()
        save_file(tensors, str(tmp / "transformer" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        (tmp / "transformer" / "config.json").write_text(json.dumps(transformer, indent=2, sort_keys=True))
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2, sort_keys=True))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    return _write_whole(Path(directory), write)


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.30.0"  # any version with DiTTransformer2DModel reads these files


# --- helpers ---------------------------------------------------------------------------------------------------------

def _check_weights(weights: dict[str, torch.Tensor], config: ModelConfig, where: str) -> None:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    problem = shape_mismatch(weights, expected)
    if problem:
        raise DCDiTError(f"{where} do not fit the {family_of(config).display_name} its config describes ({problem})")


def _write_whole(directory: Path, write) -> Path:
    """Run `write(tmp)` on a temporary sibling directory, then rename it to `directory`: a failed export leaves
    nothing behind, and an existing non-empty directory is never touched."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise DCDiTError(f"{directory} already exists and is not an empty directory; choose a new output "
                         f"directory or remove it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


__all__ = ["Exported", "save_pretrained", "from_pretrained", "load_pretrained", "is_export", "export_diffusers",
           "DEFAULT_SAMPLING", "CONFIG_FILE", "WEIGHTS_FILE"]
