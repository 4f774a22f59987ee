"""`dcdit sample` and `dcdit export`: a model from a checkpoint, a run (by folder or by name in a storage), an export
directory or an MLflow model (models:/...), then PNGs named by class and seed (with a grid and, for routed models,
boundary maps), or an export.

Image (class C, seed S) is sample i = S * K + C (K = the model's classes) of evaluation's plan with base seed 0:
its noise comes from SeedSequence([0, i]) alone, so it is the same in any batch, with any --per-class.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.store.artifact.utils.models import get_model_name_and_version

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
from dcdit_platform.secrets import redact
from dcdit_platform.storage import open_storage
from dcdit_platform.tracking import Tracker, resolve_tracking_uri

SAMPLES_DIR = "dcdit-samples"  # the default output folder, under the working directory (in .gitignore)
MODEL_URI_PREFIX = "models:/"  # an MLflow model: models:/NAME/VERSION, models:/NAME@ALIAS, models:/m-ID
EXPORT_ARTIFACT = "export"  # the pyfunc artifact holding the model's `dcdit export` directory
MODEL_DOWNLOAD_TIMEOUT_S = 30.0  # how long an unreachable tracking server is retried


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
    """CHECKPOINT_OR_RUN: an export directory, a checkpoint or run directory (local or s3://), a run name in
    `storage` (default: `dcdit train`'s storage), or an MLflow model URI (`download_model`)."""
    if ref.startswith(MODEL_URI_PREFIX):
        with tempfile.TemporaryDirectory(prefix="dcdit-model-") as tmp:
            return dataclasses.replace(resolve(download_model(ref, tmp, storage)), uri=ref)
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
                  {"checkpoint": ckpt.uri, "step": ckpt.step, "run_name": ckpt.run_name, "ema": ckpt.used_ema,
                   "mlflow_run_id": ckpt.mlflow_run_id, "experiment": config.tracking.experiment,
                   "tracking_uri": redact(config.tracking.uri) if config.tracking.uri else None})


def download_model(uri: str, dst: str, storage: str | None = None) -> str:
    """The export directory inside MLflow model `uri` (models:/NAME/VERSION, models:/m-ID, ...), downloaded into
    `dst` from the tracking server of $MLFLOW_TRACKING_URI (else the SQLite store in `storage`)."""
    tracking_uri = resolve_tracking_uri(None, storage or StorageSection().uri, create=False)
    tracker = Tracker(tracking_uri, retry_timeout_s=MODEL_DOWNLOAD_TIMEOUT_S)

    def download() -> str:
        # MLflow's own models:/ resolution reads the process-wide registry URI; this one uses the given URI.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        parts = get_model_name_and_version(client, uri)
        location = (client.get_logged_model(parts[0]).artifact_location if len(parts) == 1
                    else client.get_model_version_download_uri(*parts))
        return mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=dst, tracking_uri=tracking_uri)

    local = tracker.call(f"download of {uri}", download)
    exported = Path(local) / "artifacts" / EXPORT_ARTIFACT  # where MLflow puts a pyfunc model's artifacts
    if not is_export(exported):
        raise DCDiTError(f"MLflow model {uri} holds no dcdit export (artifacts/{EXPORT_ARTIFACT}): it was not logged "
                         "by `dcdit train` or `dcdit register`")
    return str(exported)


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
    plan = sampling_plan(src, request)
    pairs = request_pairs(src, request)
    family = family_of(src.config)
    if request.boundaries and not family.routed:
        raise DCDiTError(f"--boundaries draws a router's boundary maps; this {family.display_name} has no router")
    drawer = load_drawer(src, request.vae)
    out = Path(request.out or os.path.join(SAMPLES_DIR, _name(src)))
    out.mkdir(parents=True, exist_ok=True)
    echo(f"{len(pairs)} image(s) from {src.uri} on {drawer.device.type}: {plan.sampler} {plan.steps} steps, "
         f"cfg {plan.cfg_scale:g}{', Lite-CFG' if plan.lite_cfg else ''}")
    files, images, maps = [], [], []
    for batch, pixels, recorder in drawer.draw(plan, pairs, request.batch_size, boundaries=request.boundaries):
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
                               "lite_cfg": plan.lite_cfg, "tail_drop": plan.rho, "vae": drawer.vae_name,
                               "device": drawer.device.type, **{k: v for k, v in src.info.items() if k != "checkpoint"}}
    if request.grid:
        grid = np.concatenate(images)
        summary["grid"] = str(sample_grid(grid, out / "grid.png", nrow=request.per_class if
                                          len(request.classes) > 1 else min(8, len(grid))))
    if maps:
        summary["boundary_maps"] = maps
    return summary


@dataclass
class Drawer:
    """A model loaded to draw from (with its VAE for latent models): `dcdit sample` and the MLflow pyfunc model
    both draw through `draw`, so that the same (class, seed, settings) gives the same pixels."""

    src: Source
    model: torch.nn.Module
    vae: Any
    vae_name: str | None
    device: torch.device

    def draw(self, plan, pairs: Sequence[tuple[int, int]], batch_size: int, *, boundaries: bool = False):
        """Yields (the batch's (class, seed) pairs, their uint8 HWC pixels, the RoutingRecorder or None)."""
        cfg = self.src.config
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        for start in range(0, len(pairs), batch_size):
            batch = list(pairs[start:start + batch_size])
            indices = np.array([seed * plan.num_classes + label for label, seed in batch], dtype=np.int64)
            recorder = RoutingRecorder(self.model) if boundaries else None
            with torch.no_grad():
                pixels, _ = generate(recorder or self.model, plan, indices, shape, device=self.device, vae=self.vae)
            yield batch, pixels, recorder


def load_drawer(src: Source, vae: str | None = None) -> Drawer:
    """The model of `src` in eval mode on the GPU when there is one, with the VAE (`vae`, else the source's)."""
    vae_name = vae or src.vae
    if vae_name is None and src.config.in_channels not in (1, 3):
        raise DCDiTError(f"this model makes {src.config.in_channels}-channel latents and names no VAE to decode "
                         f"them; pass --vae DIR (an AutoencoderKL directory)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(src.config)
    model.load_state_dict(src.weights)
    model = model.to(device).eval().requires_grad_(False)
    return Drawer(src, model, load_vae(vae_name, device=device) if vae_name else None, vae_name, device)


def sampling_plan(src: Source, request: SampleRequest):
    """The sampling plan of the request's settings over the source's defaults (evaluation's checks and
    construction, reused)."""
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
    return proto.sampling_plan(proto.tail_drop, src.config, src.num_timesteps, src.config.num_classes)  # seed 0


def check_pairs(src: Source, pairs: Sequence[tuple[int, int]]) -> None:
    """Refuse a class the model does not know or a negative seed, naming it."""
    if not pairs:
        raise DCDiTError("no class given: pass --class C [C ...]")
    bad = [c for c, _ in pairs if not 0 <= c < src.config.num_classes]
    if bad:
        raise DCDiTError(f"--class {bad[0]} is out of range: this model knows classes 0..{src.config.num_classes - 1}")
    if min(s for _, s in pairs) < 0:
        raise DCDiTError(f"seeds must be >= 0 (got {min(s for _, s in pairs)})")


def request_pairs(src: Source, request: SampleRequest) -> list[tuple[int, int]]:
    """The (class, seed) of each requested image: seeds S, S+1, ... of each class, classes in the given order."""
    if request.per_class < 1 or request.seed < 0 or request.batch_size < 1:
        raise DCDiTError(f"--per-class and --batch-size must be >= 1 and --seed >= 0 (got {request.per_class}, "
                         f"{request.batch_size}, {request.seed})")
    pairs = [(c, request.seed + k) for c in dict.fromkeys(request.classes) for k in range(request.per_class)]
    check_pairs(src, pairs)
    return pairs


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


__all__ = ["Source", "SampleRequest", "Drawer", "resolve", "sample", "export", "load_drawer", "sampling_plan",
           "check_pairs", "download_model"]
