"""`dcdit sample` and `dcdit export`: a model from a checkpoint, a run (by folder or by name in a storage) or an export
directory, then PNGs named by class and seed (with a grid and, for routed models, boundary maps), or an export.

Image (class C, seed S) is sample i = S * K + C (K = the model's classes) of evaluation's plan with base seed 0:
its noise comes from SeedSequence([0, i]) alone, so it is the same in any batch, with any --per-class.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcdit.config import ModelConfig
from dcdit.data.vae import load_vae
from dcdit.diffusion import create_diffusion
from dcdit.errors import DCDiTError
from dcdit.export import DEFAULT_SAMPLING, export_diffusers, is_export, load_pretrained, save_pretrained
from dcdit.generate import generate
from dcdit.models import build_model, family_of
from dcdit.viz import RoutingRecorder, boundary_maps, sample_grid
from dcdit_platform.config.sections import StorageSection
from dcdit_platform.evaluation.protocol import EvalConfig
from dcdit_platform.evaluation.sources import generation_geometry
from dcdit_platform.runs import open_checkpoint
from dcdit_platform.storage import open_storage

SAMPLES_DIR = "dcdit-samples"  # the default output folder, under the working directory (in .gitignore)


@dataclass
class Source:
    """A model to sample from, wherever it came from."""

    uri: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    num_timesteps: int
    num_classes: int  # classes of its training data
    vae: str | None
    sampling: dict[str, Any]  # default sampler settings
    info: dict[str, Any]  # checkpoint, step, run name, whether the weights are EMA


def resolve(ref: str, storage: str | None = None) -> Source:
    """CHECKPOINT_OR_RUN: an export directory, a checkpoint or run directory (local or s3://), or a run name in
    `storage` (default: `dcdit train`'s storage)."""
    if os.path.isdir(ref) and is_export(ref):
        exported = load_pretrained(ref)
        return Source(ref, exported.config, exported.model.state_dict(), exported.num_timesteps,
                      exported.num_classes, exported.vae, exported.sampling, exported.source)
    if "://" not in ref and not os.path.exists(ref):
        root = storage or StorageSection().uri
        if os.sep in ref.strip(os.sep) or "://" not in root and not os.path.isdir(os.path.join(root, ref)):
            raise DCDiTError(f"no checkpoint, run or export at {ref!r} (nor a run of that name in {root}): pass a "
                             f"checkpoint or run directory, an export directory, or a run name with --storage URI")
        ref = open_storage(root).child(ref).uri
    ckpt = open_checkpoint(ref)
    config = ckpt.config
    geometry = generation_geometry(config)
    return Source(ckpt.uri, config.model, ckpt.weights, config.diffusion.num_timesteps, geometry.num_classes,
                  geometry.vae, dict(DEFAULT_SAMPLING),
                  {"checkpoint": ckpt.uri, "step": ckpt.step, "run_name": ckpt.run_name, "ema": ckpt.used_ema})


def export(ref: str, out_dir: str, *, diffusers: bool = False, storage: str | None = None) -> dict:
    """Write the export (or, with `diffusers`, the diffusers DiTPipeline directory) of CHECKPOINT_OR_RUN."""
    src = resolve(ref, storage)
    if diffusers:
        path = export_diffusers(out_dir, config=src.config, weights=src.weights, num_timesteps=src.num_timesteps)
    else:
        path = save_pretrained(out_dir, config=src.config, weights=src.weights, num_timesteps=src.num_timesteps,
                               num_classes=src.num_classes, vae=src.vae, sampling=src.sampling, source=src.info)
    return {"out": str(path), "format": "diffusers" if diffusers else "dcdit", "source": src.uri,
            "arch": src.config.arch, "vae": src.vae, **{k: v for k, v in src.info.items() if k != "checkpoint"}}


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """What `dcdit sample` draws; None settings come from the export (or DEFAULT_SAMPLING)."""

    classes: Sequence[int]
    per_class: int = 1
    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    lite_cfg: bool = False
    tail_drop: float | None = None
    vae: str | None = None
    out: str | None = None  # default: dcdit-samples/RUN-stepSTEP
    grid: bool = False
    boundaries: bool = False
    batch_size: int = 16


def sample(ref: str, request: SampleRequest, *, storage: str | None = None,
           echo: Callable[[str], None] = lambda text: None) -> dict:
    """Draw the requested images of CHECKPOINT_OR_RUN into PNG files; returns a summary (paths, settings)."""
    src = resolve(ref, storage)
    plan, pairs = _plan(src, request)
    family = family_of(src.config)
    if request.boundaries and not family.routed:
        raise DCDiTError(f"--boundaries draws a router's boundary maps; this {family.display_name} has no router")
    vae_name = request.vae or src.vae
    if vae_name is None and src.config.in_channels not in (1, 3):
        raise DCDiTError(f"this model makes {src.config.in_channels}-channel latents and names no VAE to decode "
                         f"them; pass --vae DIR (an AutoencoderKL directory)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(src.config)
    model.load_state_dict(src.weights)
    model = model.to(device).eval().requires_grad_(False)
    vae = load_vae(vae_name, device=device) if vae_name else None
    out = Path(request.out or os.path.join(SAMPLES_DIR, _name(src)))
    out.mkdir(parents=True, exist_ok=True)
    shape = (src.config.in_channels, src.config.input_size, src.config.input_size)
    echo(f"{len(pairs)} image(s) from {src.uri} on {device.type}: {plan.sampler} {plan.steps} steps, "
         f"cfg {plan.cfg_scale:g}{', Lite-CFG' if plan.lite_cfg else ''}")
    files, images, maps = [], [], []
    for start in range(0, len(pairs), request.batch_size):
        batch = pairs[start:start + request.batch_size]
        indices = np.array([seed * plan.num_classes + label for label, seed in batch], dtype=np.int64)
        recorder = RoutingRecorder(model) if request.boundaries else None
        with torch.no_grad():
            pixels, _ = generate(recorder or model, plan, indices, shape, device=device, vae=vae)
        for k, (label, seed) in enumerate(batch):
            path = out / f"class{label:04d}_seed{seed}.png"
            _write_png(pixels[k], path)
            files.append(str(path))
        images.append(pixels)
        if recorder is not None:
            maps += _boundary_maps(recorder, pixels, batch, out)
    summary: dict[str, Any] = {"out": str(out), "files": files, "source": src.uri, "arch": src.config.arch,
                               "classes": list(request.classes), "seeds": sorted({s for _, s in pairs}),
                               "sampler": plan.sampler, "steps": plan.steps, "cfg_scale": plan.cfg_scale,
                               "lite_cfg": plan.lite_cfg, "tail_drop": plan.rho, "vae": vae_name,
                               "device": device.type, **{k: v for k, v in src.info.items() if k != "checkpoint"}}
    if request.grid:
        grid = np.concatenate(images)
        summary["grid"] = str(sample_grid(grid, out / "grid.png", nrow=request.per_class if
                                          len(request.classes) > 1 else min(8, len(grid))))
    if maps:
        summary["boundary_maps"] = maps
    return summary


def _plan(src: Source, request: SampleRequest):
    """The sampling plan (evaluation's checks and construction, reused) and the (class, seed) of each image."""
    settings = {**src.sampling, **{k: v for k, v in (("sampler", request.sampler), ("steps", request.steps),
                                                      ("cfg_scale", request.cfg_scale),
                                                      ("tail_drop", request.tail_drop)) if v is not None}}
    # Lite-CFG at scale 1 takes evaluation's Lite-CFG scale (EvalConfig.guidance_scale), as `dcdit eval` does.
    proto = EvalConfig(checkpoint=src.uri, sampler=settings["sampler"], sample_steps=int(settings["steps"]),
                       cfg_scale=float(settings["cfg_scale"]), lite_cfg=request.lite_cfg or bool(settings["lite_cfg"]),
                       tail_drop=settings["tail_drop"])
    proto.validate()
    proto.check_model(src.config)
    if proto.sample_steps > src.num_timesteps:
        raise DCDiTError(f"--steps {proto.sample_steps} is more than the model's {src.num_timesteps} diffusion steps")
    create_diffusion(f"ddim{proto.sample_steps}" if proto.sampler == "ddim" else str(proto.sample_steps),
                     num_timesteps=src.num_timesteps)  # refuses an impossible step count before anything is drawn
    classes = list(request.classes)
    if not classes:
        raise DCDiTError("no class given: pass --class C [C ...]")
    bad = [c for c in classes if not 0 <= c < src.config.num_classes]
    if bad:
        raise DCDiTError(f"--class {bad[0]} is out of range: this model knows classes 0..{src.config.num_classes - 1}")
    if request.per_class < 1 or request.seed < 0 or request.batch_size < 1:
        raise DCDiTError(f"--per-class and --batch-size must be >= 1 and --seed >= 0 (got {request.per_class}, "
                         f"{request.batch_size}, {request.seed})")
    plan = proto.sampling_plan(proto.tail_drop, src.config, src.num_timesteps, src.config.num_classes)  # seed 0
    pairs = [(c, request.seed + k) for c in dict.fromkeys(classes) for k in range(request.per_class)]
    return plan, pairs


def _name(src: Source) -> str:
    """The default output folder's name: run-step (smoke-step12), else the checkpoint's or export's folder name."""
    run, step = src.info.get("run_name"), src.info.get("step")
    return f"{run}-step{step}" if run and step is not None else src.uri.rstrip("/").rsplit("/", 1)[-1]


def _write_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path, format="PNG")


def _boundary_maps(recorder: RoutingRecorder, pixels: np.ndarray, batch: list[tuple[int, int]],
                   out: Path) -> list[str]:
    """One PNG per image: its boundary probabilities at six timesteps from noisy to clean, over the image."""
    probs = recorder.probs_over_time()[:, :len(batch)]  # under guidance the conditional half comes first
    picks = sorted({round(i * (len(recorder.timesteps) - 1) / 5) for i in range(6)})
    timesteps = [recorder.timesteps[i] for i in picks]
    return [str(boundary_maps(probs[picks, k:k + 1], timesteps, out / f"class{label:04d}_seed{seed}_boundaries.png",
                              images=pixels[k:k + 1], labels=[f"class {label}"]))
            for k, (label, seed) in enumerate(batch)]


__all__ = ["Source", "SampleRequest", "resolve", "sample", "export"]
