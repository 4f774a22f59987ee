"""The evaluation protocol: `EvalConfig` (one evaluation of one checkpoint) and its checks, the sampling plan per
tail-drop fraction, the protocol record every result carries, and its slug (the name results are filed under).

Every field that changes the numbers is in the protocol record; PROTOCOL_PARAMS are the ones logged as MLflow params.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from dcdit.config import ModelConfig
from dcdit.errors import DCDiTError
from dcdit.features import DOMAIN_EXTRACTOR, INCEPTION
from dcdit.generate import SamplingPlan
from dcdit.models.family import FAMILIES, family_of
from dcdit_platform.evaluation.extractors import ExtractorSpec
from dcdit_platform.evaluation.sources import Geometry
from dcdit_platform.runs import LoadedCheckpoint

ALL_METRICS = ("fid", "sfid", "is", "kid", "pr")
LITE_CFG_SCALE = 1.25  # the paper's Lite-CFG guidance scale, used when --lite-cfg comes without --cfg-scale
PROTOCOL_PARAMS = ("checkpoint", "num_samples", "sampler", "steps", "cfg_scale", "cfg_channels", "lite_cfg", "seed",
                   "num_classes", "batch_size", "shard_size", "extractor", "weights_sha256", "reference",
                   "reference_id", "vae", "image_size", "ema", "rho")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation of one checkpoint; every field that changes the numbers is in `protocol_record`."""

    checkpoint: str  # a checkpoint directory (or a run directory: its latest checkpoint), local or s3://
    num_samples: int = 50_000
    workers: int | None = None  # actors; None = one per GPU, else one per CPU of the cluster
    sampler: str = "ddpm"  # "ddpm" | "ddim" (eta 0)
    sample_steps: int = 250
    cfg_scale: float = 1.0
    tail_drop: float | None = None
    tail_drop_sweep: tuple[float, ...] | None = None
    lite_cfg: bool = False
    reference: str | None = None  # npz (ADM batch or statistics), dataset, folder, 'synthetic'; None = training data
    extractor: str | None = None  # None: the domain classifier on synthetic data, else Inception
    weights: str | None = None
    export_npz: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    track: bool = True
    address: str | None = None
    seed: int = 0
    batch_size: int = 64  # samples per generation batch (fixed: results are bit-identical for any worker count)
    shard_size: int = 1024  # samples per shard (the unit of work and of recomputation)
    reference_samples: int = 50_000  # reference images whose statistics are computed (dataset references)
    pr_reference_samples: int = 10_000  # reference images used for precision/recall and KID
    metrics: tuple[str, ...] = ALL_METRICS
    cpus_per_worker: float = 1.0
    max_actor_failures: int = 4

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise DCDiTError(message)

        need(self.num_samples >= 2, f"--num-samples must be >= 2, got {self.num_samples}")
        need(self.workers is None or self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        need(self.sampler in ("ddpm", "ddim"), f"--sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        need(self.sample_steps >= 1, f"--sample-steps must be >= 1, got {self.sample_steps}")
        need(self.cfg_scale >= 1.0, f"--cfg-scale must be >= 1 (1 = no guidance), got {self.cfg_scale}")
        need(not (self.tail_drop is not None and self.tail_drop_sweep),
             "give --tail-drop or --tail-drop-sweep, not both")
        for rho in self.rhos():
            need(rho is None or 0.0 <= rho < 1.0, f"tail-drop fractions must be in [0, 1), got {rho}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.shard_size >= 1 and self.shard_size % self.batch_size == 0,
             f"--shard-size ({self.shard_size}) must be a positive multiple of --batch-size ({self.batch_size})")
        need(self.reference_samples >= 2, f"--reference-samples must be >= 2, got {self.reference_samples}")
        need(self.pr_reference_samples >= 0, "--pr-reference-samples must be >= 0")
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        need(not unknown, f"unknown metric {unknown[:1]}; choose from {', '.join(ALL_METRICS)}")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        need(self.max_actor_failures >= 0, "max_actor_failures must be >= 0")

    def check_model(self, model: ModelConfig) -> None:
        """Refuse settings the checkpoint's model cannot sample with, before any work starts."""
        family = family_of(model)
        if not family.routed and (any(r is not None for r in self.rhos()) or self.lite_cfg):
            routed = " / ".join(f.display_name for f in FAMILIES.values() if f.routed)
            raise DCDiTError(f"--tail-drop, --tail-drop-sweep and --lite-cfg apply to {routed} checkpoints; this "
                             f"one is a {family.display_name}")
        if self.guidance_scale() > 1.0 and model.class_dropout_prob <= 0:
            raise DCDiTError("classifier-free guidance needs a model trained with class dropout "
                             "(model.class_dropout_prob > 0); this one has no null class")

    def rhos(self) -> list[float | None]:
        """The tail-drop fractions evaluated, one result each (None: no tail drop)."""
        return list(self.tail_drop_sweep) if self.tail_drop_sweep else [self.tail_drop]

    def guidance_scale(self) -> float:
        return LITE_CFG_SCALE if self.lite_cfg and self.cfg_scale == 1.0 else self.cfg_scale

    def metrics_for(self, extractor: str) -> set[str]:
        """The metrics computed: sFID and IS are Inception's own."""
        return set(self.metrics) - ({"sfid", "is"} if extractor != INCEPTION else set())

    def sampling_plan(self, rho: float | None, model: ModelConfig, num_timesteps: int,
                      num_classes: int) -> SamplingPlan:
        return SamplingPlan(sampler=self.sampler, steps=self.sample_steps, num_timesteps=num_timesteps,
                            learn_sigma=model.learn_sigma, cfg_scale=self.guidance_scale(), lite_cfg=self.lite_cfg,
                            rho=rho, null_class=model.num_classes, seed=self.seed, num_classes=num_classes)

    def export_path(self, rho: float | None) -> str | None:
        """Where --export-npz writes the samples of fraction `rho`: one batch per fraction in a tail-drop sweep."""
        export = self.export_npz
        if export and len(self.rhos()) > 1:  # samples-rho0.2.npz
            export = f"{export[:-4] if export.endswith('.npz') else export}-rho{rho:g}.npz"
        return export


def shards_of(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `shard_size` items: the unit of work, and of recomputation when an actor dies."""
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def protocol_record(cfg: EvalConfig, ckpt: LoadedCheckpoint, geometry: Geometry, spec: ExtractorSpec, *,
                    reference: str, reference_id: str, reference_cached: bool) -> dict:
    """What was evaluated and how: the fields every result (JSON, MLflow params, report) carries."""
    cfg_scale = cfg.guidance_scale()
    return {"checkpoint": ckpt.uri, "step": ckpt.step, "ema": ckpt.used_ema, "num_samples": cfg.num_samples,
            "sampler": cfg.sampler, "steps": cfg.sample_steps, "cfg_scale": cfg_scale,
            "cfg_channels": 3 if cfg_scale > 1.0 else None, "lite_cfg": cfg.lite_cfg, "seed": cfg.seed,
            "num_classes": geometry.num_classes, "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
            "extractor": spec.name, "weights_sha256": spec.weights_sha256, "reference": reference,
            "reference_id": reference_id, "reference_cached": reference_cached, "vae": geometry.vae,
            "image_size": geometry.image_size, "labels": "i mod num_classes", "seeds": "SeedSequence([seed, i])"}


def protocol_slug(protocol: dict, rhos: list) -> str:
    """A readable, unique name of the protocol for MLflow keys and result files: n50000-ddpm250-cfg1.5-1a2b3c."""
    head = f"n{protocol['num_samples']}-{protocol['sampler']}{protocol['steps']}-cfg{protocol['cfg_scale']:g}"
    if protocol["lite_cfg"]:
        head += "-lite"
    if protocol["extractor"] != INCEPTION:
        head += "-domain" if protocol["extractor"] == DOMAIN_EXTRACTOR else f"-{protocol['extractor']}"
    body = {k: protocol[k] for k in ("seed", "batch_size", "shard_size", "weights_sha256", "reference_id",
                                     "num_classes", "extractor")}
    body["rhos"] = rhos
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{head}-{digest}"
