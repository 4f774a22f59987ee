"""The evaluation actor and the typed messages it exchanges with the driver: an `ExtractTask` (features of reference
images) or a `GenerateTask` (samples of a shard, then their features) goes in; a `ShardResult` (mergeable float64
statistics, kept features, images, FLOPs) or a one-line `TaskError` comes back.

A task fixes every sample it computes (indices, seeds, batches), so any actor computes it to the same result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from dcdit.config import ModelConfig
from dcdit.data.vae import load_vae
from dcdit.errors import DCDiTError
from dcdit.generate import SamplingPlan, generate
from dcdit.metrics import FeatureStats
from dcdit.models import build_model
from dcdit_platform.evaluation.extractors import ExtractorSpec
from dcdit_platform.evaluation.metrics import accumulate
from dcdit_platform.evaluation.sources import ImageSource, Reader


@dataclass(frozen=True)
class ModelSpec:
    """The model generating actors sample from."""

    config: ModelConfig
    state: Any  # ObjectRef of the state dict (the EMA weights when the checkpoint has them)
    vae: str | None  # decodes the model's latents; None for a pixel model


@dataclass
class ShardResult:
    """What an actor sends back for one task."""

    shard: int
    stats: dict[str, dict[str, np.ndarray]]  # "pool" / "spatial" -> FeatureStats sums (mergeable in shard order)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # per-image features the task asked to keep
    images: np.ndarray | None = None  # generated images below the task's `images_below`
    flops: float = 0.0  # counted FLOPs of the model calls of `flops_images` images
    flops_images: int = 0


@dataclass(frozen=True)
class TaskError:
    """A user error in an actor, sent back as one line (raised, Ray would wrap it in a remote traceback)."""

    message: str


class _ShardBuilder:
    """Extracts features batch by batch and assembles the shard's result."""

    def __init__(self, extractor, shard: int, keep: tuple[str, ...]):
        self.extractor, self.shard, self.keep = extractor, shard, keep
        self.stats: dict[str, FeatureStats] = {}
        self.kept: dict[str, list[np.ndarray]] = {}

    def add(self, images: np.ndarray) -> None:
        features = self.extractor(images)
        accumulate(self.stats, features)
        for key in self.keep:
            if key in features:
                self.kept.setdefault(key, []).append(features[key].numpy())

    def result(self, **extra) -> ShardResult:
        # The sums travel; moments are derived after merging.
        return ShardResult(shard=self.shard, stats={k: v.to_arrays(moments=False) for k, v in self.stats.items()},
                           features={k: np.concatenate(v) for k, v in self.kept.items()}, **extra)


@dataclass(frozen=True)
class ExtractTask:
    """Features of the reference images `indices` of `source`, read in batches of `batch_size`."""

    shard: int
    source: ImageSource
    indices: np.ndarray
    batch_size: int
    keep: tuple[str, ...] = ()  # per-image features sent back ("pool" for precision/recall and KID)

    def compute(self, worker: EvalWorker) -> ShardResult:
        read = worker.reader(self.source)
        shard = _ShardBuilder(worker.extractor, self.shard, self.keep)
        indices = np.asarray(self.indices, dtype=np.int64)
        for start in range(0, len(indices), self.batch_size):
            shard.add(read(indices[start:start + self.batch_size]))
        return shard.result()


@dataclass(frozen=True)
class GenerateTask:
    """Samples [start, stop) generated in batches of `batch_size`, and their features."""

    shard: int
    start: int
    stop: int
    plan: SamplingPlan
    shape: tuple[int, int, int]
    batch_size: int
    keep: tuple[str, ...] = ()  # per-image features sent back ("pool", "logits")
    count_flops: bool = False  # count the FLOPs of the first batch's model calls
    images_below: int = 0  # send back the images of samples with a smaller index (sample grid, --export-npz)

    def compute(self, worker: EvalWorker) -> ShardResult:
        model, vae = worker.generator()
        shard = _ShardBuilder(worker.extractor, self.shard, self.keep)
        flops, flops_images, images_kept = 0.0, 0, []
        for b, start in enumerate(range(self.start, self.stop, self.batch_size)):
            indices = np.arange(start, min(start + self.batch_size, self.stop))
            images, counted = generate(model, self.plan, indices, self.shape, device=worker.device, vae=vae,
                                       count_flops=b == 0 and self.count_flops)
            if counted is not None:
                flops += counted
                flops_images += len(indices)
            below = indices < self.images_below
            if below.any():
                images_kept.append(images[below])
            shard.add(images)
        return shard.result(images=np.concatenate(images_kept) if images_kept else None, flops=flops,
                            flops_images=flops_images)


class EvalWorker:
    """What each evaluation actor holds (built once per actor by the pool's Ray Data callable): one extractor and,
    once it generates, the model; computes tasks."""

    def __init__(self, extractor: ExtractorSpec, model: ModelSpec | None, threads: int, secrets: Any = None):
        if secrets is not None:  # WorkerSecrets, sent as an ObjectRef: credentials this machine's processes may lack
            ray.get(secrets).export_env()
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            # Recomputing a lost shard must give the same numbers: deterministic kernels, full fp32 (no TF32).
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.init_error = None
        self.extractor = self.model = self.vae = None
        self.model_spec = model
        self._readers: dict[str, Reader] = {}
        try:
            self.extractor = extractor.resolved(ray.get).build(self.device)
        except DCDiTError as err:
            self.init_error = str(err)

    def run(self, task: ExtractTask | GenerateTask) -> ShardResult | TaskError:
        if self.init_error:
            return TaskError(self.init_error)
        try:
            return task.compute(self)
        except DCDiTError as err:
            return TaskError(str(err))

    def reader(self, source: ImageSource) -> Reader:
        """The source's reader, opened once per actor."""
        key = json.dumps(source.identity, sort_keys=True)
        if key not in self._readers:
            self._readers[key] = source.resolved(ray.get).reader()
        return self._readers[key]

    def generator(self) -> tuple[torch.nn.Module, Any]:
        """(model, VAE or None), loaded on first use: extraction-only actors never hold a model."""
        if self.model is None:
            spec = self.model_spec
            model = build_model(spec.config)
            model.load_state_dict(ray.get(spec.state) if not isinstance(spec.state, dict) else spec.state)
            self.model = model.to(self.device).eval().requires_grad_(False)
            if spec.vae:
                self.vae = load_vae(spec.vae, device=self.device)
        return self.model, self.vae

