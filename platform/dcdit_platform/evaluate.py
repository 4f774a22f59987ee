"""The distributed sample-quality evaluator: Ray actors generate class-balanced samples with per-sample seeds,
extract features and return float64 statistics per shard; the driver merges them in shard order and computes FID
(FD for non-Inception extractors), sFID, IS, KID, precision/recall and class accuracy.

Sample i has seed SeedSequence([seed, i]) and label i mod num_classes, and shards are fixed ranges of sample indices
processed in fixed batches, so the result does not depend on how many actors run or which one computes a shard:
a shard lost with its actor is recomputed elsewhere, identically. Reference statistics are cached in storage under
a key of dataset identity, extractor, weights hash and resizing. Results go to storage (JSON) and to the
checkpoint's MLflow run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcdit.errors import DCDiTError
from dcdit.features import DOMAIN_EXTRACTOR, INCEPTION, file_sha256
from dcdit.metrics import (BiasedEstimateWarning, FeatureStats, Moments, class_accuracy, frechet_distance,
                           inception_score, kernel_distance, precision_recall)
from dcdit_platform.raycluster import ray_session, target_address
from dcdit_platform.runs import LoadedCheckpoint, open_checkpoint

RESULTS_DIR = "evaluations"  # {storage}/{run name}/evaluations/{checkpoint}/{slug}.json
CACHE_DIR = "_cache"  # {storage}/_cache/fid-references/{key}.npz, {storage}/_cache/extractors/{key}.safetensors
REFERENCE_VERSION = 1  # bump when reference statistics change meaning; part of their cache key
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
ALL_METRICS = ("fid", "sfid", "is", "kid", "pr")
GRID_IMAGES = 64


# =====================================================================================================================
# Protocol
# =====================================================================================================================

@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation of one checkpoint; every field that changes the numbers is in `protocol()`."""

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
    extractor: str = INCEPTION
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

    def rhos(self) -> list[float | None]:
        return list(self.tail_drop_sweep) if self.tail_drop_sweep else [self.tail_drop]


def sample_seed(seed: int, index: int) -> int:
    """The seed of generated sample `index`: a function of (seed, index) only."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_labels(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Sample i has label i mod num_classes: class-balanced in every prefix (50 per class for 50K on ImageNet)."""
    return (np.asarray(indices, dtype=np.int64) % num_classes).astype(np.int64)


def quantize(images: torch.Tensor) -> np.ndarray:
    """Float NCHW in [-1, 1] -> uint8 NHWC, rounding to nearest (DiT's clamp(127.5 x + 128) then truncation)."""
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def shards_of(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


# =====================================================================================================================
# Sampling (runs in the actors)
# =====================================================================================================================

@dataclass(frozen=True)
class SamplingPlan:
    """How one batch is generated: sampler, steps, guidance, tail drop, decoding."""

    sampler: str
    steps: int
    num_timesteps: int
    learn_sigma: bool
    cfg_scale: float
    lite_cfg: bool
    rho: float | None
    null_class: int
    seed: int
    num_classes: int
    arch: str

    def guidance(self):
        from dcdit.diffusion import Guidance

        if self.lite_cfg:
            rho = self.rho or 0.0
            return Guidance(scale=self.cfg_scale, guided_channels=3, tail_drop=(rho, max(0.9, rho)))
        if self.cfg_scale > 1.0:
            tail = (self.rho, self.rho) if self.rho else None
            return Guidance(scale=self.cfg_scale, guided_channels=3, tail_drop=tail)
        return None

    def forwards_per_step(self) -> int:
        return 2 if self.guidance() is not None else 1


def generate(model: torch.nn.Module, plan: SamplingPlan, indices: np.ndarray, shape: tuple[int, int, int], *,
             device: torch.device, vae=None, count_flops: bool = False) -> tuple[np.ndarray, float | None]:
    """uint8 NHWC images of samples `indices` (and the FLOPs of their model calls when `count_flops`)."""
    from dcdit.diffusion import create_diffusion, ddim_sample, ddpm_sample, per_sample_generators

    respacing = f"ddim{plan.steps}" if plan.sampler == "ddim" else str(plan.steps)
    diffusion = create_diffusion(respacing, num_timesteps=plan.num_timesteps, learn_sigma=plan.learn_sigma)
    y = torch.from_numpy(sample_labels(indices, plan.num_classes)).to(device)
    generators = per_sample_generators([sample_seed(plan.seed, int(i)) for i in indices])
    guidance = plan.guidance()
    model_fn = guidance.wrap(model, plan.null_class) if guidance is not None else model
    kwargs = {"tail_drop": float(plan.rho)} if plan.rho and guidance is None else {}
    sample = ddim_sample if plan.sampler == "ddim" else ddpm_sample
    counter = None
    if count_flops:
        from dcdit.flops import flop_counter

        counter = flop_counter()
    with counter if counter is not None else contextlib.nullcontext():
        x = sample(diffusion, model_fn, (len(indices), *shape), y, generator=generators, device=device,
                   model_kwargs=kwargs)
    if vae is not None:
        from dcdit.data.vae import decode

        x = decode(vae, x)
    flops = float(counter.get_total_flops()) if counter is not None else None
    return quantize(x), flops


# =====================================================================================================================
# Image sources (reference datasets), readable in any process
# =====================================================================================================================

@dataclass(frozen=True)
class ImageSource:
    """A readable set of reference images: kind + what is needed to open it in an actor + its identity."""

    kind: str  # "synthetic" | "shards" | "folder" | "array"
    spec: dict  # how to open it (URIs, parameters); "array" holds an ObjectRef or ndarray
    identity: dict  # what determines its content (never a path alone)
    size: int
    label: str  # for people: what it is

    def open(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function: sample indices -> uint8 NHWC images."""
        if self.kind == "synthetic":
            from dcdit.data.synthetic import render

            s = self.spec
            return lambda idx: render(idx, seed=s["seed"], image_size=s["image_size"],
                                      num_classes=s["num_classes"]).images
        if self.kind == "shards":
            from dcdit.data.shards import open_dataset
            from dcdit_platform.storage import open_storage

            storage = open_storage(self.spec["uri"])
            data = open_dataset(storage.root, filesystem=storage.filesystem, name=self.label)
            return lambda idx: data.read(idx)[0]
        if self.kind == "folder":
            from dcdit_platform.storage import open_storage

            storage = open_storage(self.spec["uri"])
            files, crop = self.spec["files"], self.spec.get("crop")
            return lambda idx: read_images(storage, [files[i] for i in idx], crop=crop)
        if self.kind == "array":
            arr = self.spec["array"]
            if not isinstance(arr, np.ndarray):
                import ray

                arr = ray.get(arr)
            return lambda idx: np.ascontiguousarray(arr[np.asarray(idx)])
        raise DCDiTError(f"unknown image source kind {self.kind!r}")


def read_images(storage, files: Sequence[str], *, crop: int | None = None) -> np.ndarray:
    """uint8 NHWC images from files relative to `storage` (RGB; ADM centre crop to `crop` when given)."""
    from PIL import Image

    out = []
    for rel in files:
        with storage.open_input(rel) as f:
            image = Image.open(io.BytesIO(f.read()))
            image.load()
        if crop:
            from dcdit.data.vae import center_crop_arr

            out.append(center_crop_arr(image, crop))
        else:
            out.append(np.asarray(image.convert("RGB")))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise DCDiTError(f"images of different sizes {sorted(shapes)[:3]} in one batch; resize them, or use a "
                         "dataset reference (which centre-crops to the samples' resolution)")
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def list_images(storage) -> list[str]:
    """Image files below `storage`'s root (recursive), sorted."""
    found: list[str] = []

    def walk(rel: str) -> None:
        for name in storage.listdir(rel):
            if name.startswith("."):
                continue
            path = f"{rel}/{name}" if rel else name
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(path)
            elif storage.isdir(path):
                walk(path)

    walk("")
    return sorted(found)


def folder_identity(storage, files: Sequence[str], *, content_limit: int = 2 << 30) -> str:
    """A hash of the folder's images: of their bytes when they total at most `content_limit` (2 GiB), else of
    (path, size, mtime) per file. Any added, removed or rewritten image changes it."""
    infos = [storage.info(rel) for rel in files]
    digest = hashlib.sha256()
    if sum(int(i.size or 0) for i in infos) <= content_limit:
        digest.update(b"content\n")
        for rel in files:
            digest.update(f"{rel}\t{storage.sha256(rel)}\n".encode())
    else:
        digest.update(b"stat\n")
        for rel, info in zip(files, infos):
            mtime = getattr(info, "mtime_ns", None) or (info.mtime.timestamp() if info.mtime else "")
            digest.update(f"{rel}\t{info.size}\t{mtime}\n".encode())
    return digest.hexdigest()


# =====================================================================================================================
# Extractor specs: what an actor needs to build the same extractor as the driver
# =====================================================================================================================

@dataclass(frozen=True)
class ExtractorSpec:
    name: str
    weights_path: str | None  # on the driver's machine
    weights_sha256: str | None
    blob: Any = None  # ObjectRef of the weights file's bytes (actors on other machines)
    identity: dict = field(default_factory=dict)
    dims: dict = field(default_factory=dict)

    def build(self, device: torch.device, *, spatial: bool = True):
        from dcdit.features import build_extractor

        path = self.weights_path
        if path is not None and not (os.path.isfile(path) and file_sha256(path) == self.weights_sha256):
            import ray

            data = ray.get(self.blob)
            local = Path(tempfile.gettempdir()) / f"dcdit-weights-{self.weights_sha256[:16]}{Path(path).suffix}"
            if not (local.is_file() and file_sha256(local) == self.weights_sha256):
                tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, local)
            path = str(local)
        return build_extractor(self.name, path, spatial=spatial, device=device)


def prepare_extractor(name: str, weights: str | None, *, storage=None, domain_source: dict | None = None,
                      echo: Callable[[str], None] | None = None, build: bool = False) -> tuple[ExtractorSpec, Any]:
    """Resolve and check the weights on the driver, so errors come before Ray starts. Returns the spec actors build
    from and, with `build`, a driver-side extractor (for Inception the spec needs no model: None otherwise)."""
    from dcdit.features import (INCEPTION_DIMS, build_extractor, inception_identity, resolve_inception_weights,
                                validate_inception_weights)

    if name == DOMAIN_EXTRACTOR and weights is None:
        weights = domain_classifier_path(storage, domain_source, echo=echo)
    elif name == INCEPTION:
        weights = str(resolve_inception_weights(weights))
    elif weights is not None and not os.path.isfile(weights):
        raise DCDiTError(f"weights file {weights} not found")
    extractor = None
    if name == INCEPTION and not build:
        validate_inception_weights(weights)
        identity, dims = inception_identity(weights), dict(INCEPTION_DIMS)
    else:
        extractor = build_extractor(name, weights, spatial=name == INCEPTION)
        identity, dims = extractor.identity, extractor.dims
    sha = file_sha256(weights) if weights is not None else None
    spec = ExtractorSpec(name=name, weights_path=str(weights) if weights else None, weights_sha256=sha,
                         identity=identity, dims=dims)
    return spec, extractor


def domain_classifier_path(storage, source: dict | None, *, echo=None) -> str:
    """The cached domain classifier for a synthetic dataset, trained once and kept in storage (local copy path)."""
    from dcdit.features import domain_classifier_key, train_domain_classifier

    if not source or source.get("kind") != "synthetic":
        raise DCDiTError(f"the {DOMAIN_EXTRACTOR} extractor is trained on the synthetic dataset; this evaluation's "
                         "data is not synthetic: use --extractor inception-v3-compat, or pass --weights")
    key = domain_classifier_key(source)
    rel = f"{CACHE_DIR}/extractors/{DOMAIN_EXTRACTOR}-{key}.safetensors"
    local = Path(tempfile.gettempdir()) / f"dcdit-{DOMAIN_EXTRACTOR}-{key}.safetensors"
    if storage is not None and storage.exists(rel):
        if not local.is_file() or local.stat().st_size != storage.size(rel):
            tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}")
            tmp.write_bytes(storage.read_bytes(rel))
            os.replace(tmp, local)
        return str(local)
    if echo:
        echo(f"training the {DOMAIN_EXTRACTOR} for synthetic data (seed {source['seed']}, "
             f"{source['image_size']}px, {source['num_classes']} classes); cached afterwards")
    model = train_domain_classifier(seed=source["seed"], image_size=source["image_size"],
                                    num_classes=source["num_classes"])
    model.save(local)
    if storage is not None:
        storage.write_bytes(rel, local.read_bytes())
    return str(local)


# =====================================================================================================================
# The actor
# =====================================================================================================================

class EvalWorker:
    """A Ray actor holding one extractor (and, for generation, the EMA model): computes shards.

    Methods return plain dicts; a user error travels back as {'error': message} so the driver can print one line
    (Ray would otherwise wrap it in a multi-line remote traceback).
    """

    def __init__(self, extractor: ExtractorSpec, model: dict | None, threads: int):
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
        self._readers: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        try:
            self.extractor = extractor.build(self.device)
        except DCDiTError as err:
            self.init_error = str(err)

    def pid(self) -> int:
        return os.getpid()

    def _load_model(self) -> None:
        if self.model is not None:
            return
        import ray
        from dcdit.config import ModelConfig, from_dict
        from dcdit.models import build_model

        spec = self.model_spec
        config = from_dict(ModelConfig, spec["config"])
        model = build_model(config)
        state = ray.get(spec["state"]) if not isinstance(spec["state"], dict) else spec["state"]
        model.load_state_dict(state)
        self.model = model.to(self.device).eval().requires_grad_(False)
        if spec.get("vae"):
            from dcdit.data.vae import load_vae

            self.vae = load_vae(spec["vae"], device=self.device)

    def run(self, task: dict) -> dict:
        if self.init_error:
            return {"error": self.init_error}
        try:
            if task["kind"] == "generate":
                return self._generate(task)
            return self._extract(task)
        except DCDiTError as err:
            return {"error": str(err)}

    def _features(self, images: np.ndarray, task: dict, out: dict, stats: dict[str, FeatureStats]) -> None:
        feats = self.extractor(images)
        for key in ("pool", "spatial"):
            if key in feats:
                stats.setdefault(key, FeatureStats.empty(feats[key].shape[1])).update(feats[key])
        for key in task.get("return", ()):
            if key in feats:
                out.setdefault(key, []).append(feats[key].numpy())

    def _finish(self, task: dict, out: dict, stats: dict[str, FeatureStats]) -> dict:
        for key in list(out):
            if isinstance(out[key], list):
                out[key] = np.concatenate(out[key]) if out[key] else None
        out.update({"shard": task["shard"], "pid": os.getpid(),
                    "stats": {k: v.to_arrays(moments=False) for k, v in stats.items()}})  # the sums travel
        return out

    def _extract(self, task: dict) -> dict:
        source: ImageSource = task["source"]
        key = json.dumps(source.identity, sort_keys=True)
        if key not in self._readers:
            self._readers[key] = source.open()
        read = self._readers[key]
        out: dict = {}
        stats: dict[str, FeatureStats] = {}
        indices = np.asarray(task["indices"], dtype=np.int64)
        for start in range(0, len(indices), task["batch_size"]):
            self._features(read(indices[start:start + task["batch_size"]]), task, out, stats)
        return self._finish(task, out, stats)

    def _generate(self, task: dict) -> dict:
        self._load_model()
        plan: SamplingPlan = task["plan"]
        out: dict = {"flops": 0.0, "flops_images": 0}
        stats: dict[str, FeatureStats] = {}
        images_below = task.get("images_below", 0)
        for b, start in enumerate(range(task["start"], task["stop"], task["batch_size"])):
            indices = np.arange(start, min(start + task["batch_size"], task["stop"]))
            count = b == 0 and task.get("count_flops", False)
            images, flops = generate(self.model, plan, indices, task["shape"], device=self.device, vae=self.vae,
                                     count_flops=count)
            if flops is not None:
                out["flops"] += flops
                out["flops_images"] += len(indices)
            keep = indices < images_below
            if keep.any():
                out.setdefault("images", []).append(images[keep])
            self._features(images, task, out, stats)
        return self._finish(task, out, stats)


# =====================================================================================================================
# The pool: dynamic assignment of shards to actors, recomputation of shards lost with an actor
# =====================================================================================================================

class ActorPool:
    """W actors working through a list of tasks; results are handed out in task order whatever the completion order.

    A dead actor (killed, OOM, node lost) is replaced and its unfinished tasks go back to the queue; after
    `max_failures` replacements the evaluation stops with a DCDiTError.
    """

    def __init__(self, size: int, make_actor: Callable[[], Any], *, max_failures: int = 4,
                 on_event: Callable[[dict], None] | None = None):
        import ray

        self._ray = ray
        self.make_actor, self.max_failures, self.on_event = make_actor, max_failures, on_event
        self.failures = 0
        self.actors = [make_actor() for _ in range(size)]
        self.generation = [0] * size  # bumped when a slot's actor is replaced
        self.pids = dict(enumerate(ray.get([a.pid.remote() for a in self.actors])))

    def run(self, tasks: list[dict], *, per_actor: int = 2) -> Iterator[dict]:
        """Yield each task's result dict in task order."""
        ray = self._ray
        queue = deque(range(len(tasks)))
        inflight: dict[Any, tuple[int, int, int]] = {}  # ref -> (task index, actor slot, slot generation)
        load = [0] * len(self.actors)
        done: dict[int, dict] = {}
        next_out = 0
        while next_out < len(tasks):
            for depth in range(1, per_actor + 1):  # breadth first: every actor gets work before any gets two
                for slot, actor in enumerate(self.actors):
                    if queue and load[slot] < depth:
                        i = queue.popleft()
                        inflight[actor.run.remote(tasks[i])] = (i, slot, self.generation[slot])
                        load[slot] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            i, slot, generation = inflight.pop(ref)
            if generation == self.generation[slot]:
                load[slot] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                # The task fixes every sample it computes, so recomputing it elsewhere gives the same result.
                queue.appendleft(i)
                if generation == self.generation[slot]:
                    self._replace(slot, err)
                    load[slot] = 0
                continue
            if result.get("error"):
                raise DCDiTError(result["error"])
            done[i] = result
            if self.on_event:
                self.on_event({"event": "shard_done", "task": i, "pid": result.get("pid"),
                               "pids": dict(self.pids), "done": len(done) + next_out, "total": len(tasks)})
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def _replace(self, slot: int, err: BaseException) -> None:
        self.failures += 1
        detail = " ".join(str(err).split())[:200]
        if self.failures > self.max_failures:
            raise DCDiTError(f"evaluation actors died {self.failures} times (last: {detail}); check memory and the "
                             "cluster's health")
        print(f"dcdit eval: an actor died ({detail[:120]}); recomputing its shards on a fresh actor",
              file=sys.stderr, flush=True)
        old = self.actors[slot]
        with contextlib.suppress(Exception):
            self._ray.kill(old)
        self.actors[slot] = self.make_actor()
        self.generation[slot] += 1
        self.pids[slot] = self._ray.get(self.actors[slot].pid.remote())
        if self.on_event:
            self.on_event({"event": "actor_replaced", "slot": slot, "pids": dict(self.pids)})

    def shutdown(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self._ray.kill(actor)


# =====================================================================================================================
# Merging shard results
# =====================================================================================================================

@dataclass
class Collected:
    """Everything merged from a sequence of shard results, in shard order."""

    stats: dict[str, FeatureStats] = field(default_factory=dict)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    images: list[np.ndarray] = field(default_factory=list)
    flops: float = 0.0
    flops_images: int = 0

    def add(self, result: dict) -> None:
        for key, arrays in result["stats"].items():
            part = FeatureStats.from_arrays(arrays)
            self.stats[key] = part if key not in self.stats else self.stats[key].merge(part)
        for key in ("pool", "logits"):
            if result.get(key) is not None:
                self.arrays.setdefault(key, []).append(result[key])
        if result.get("images") is not None:
            self.images.append(result["images"])
        self.flops += result.get("flops", 0.0)
        self.flops_images += result.get("flops_images", 0)

    def array(self, key: str) -> np.ndarray | None:
        parts = self.arrays.get(key)
        return np.concatenate(parts) if parts else None


# =====================================================================================================================
# References
# =====================================================================================================================

@dataclass
class Reference:
    """Reference side of the comparison: statistics (pool, optional spatial) and optional features for PR/KID."""

    label: str  # what the user passed / what it is
    reference_id: str  # short id recorded in the protocol
    pool: Moments | FeatureStats
    spatial: Moments | FeatureStats | None = None
    features: np.ndarray | None = None  # pool features of up to pr_reference_samples images
    cached: bool = False
    key: str | None = None


def _npz_arrays(storage_or_path: str) -> tuple[dict[str, np.ndarray], str]:
    """(arrays of an npz file, its sha256) from a local path or s3:// URI."""
    from dcdit_platform.storage import open_storage

    parent, _, name = storage_or_path.rstrip("/").rpartition("/")
    storage = open_storage(parent or ".")
    try:
        if storage.is_local:
            source, sha = storage.path(name), file_sha256(storage.path(name))
        else:
            data = storage.read_bytes(name)
            source, sha = io.BytesIO(data), hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        raise DCDiTError(f"{storage_or_path} not found") from None
    try:
        with np.load(source, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise DCDiTError(f"{storage_or_path} is not a readable npz file ({' '.join(str(err).split())[:120]})") \
            from None
    return arrays, sha


def npz_moments(arrays: dict[str, np.ndarray], where: str, spec: ExtractorSpec) -> tuple[Moments, Moments | None]:
    """Statistics stored in an npz (ADM reference batch or this evaluator's cache / `dcdit fid` output)."""
    if "mu" not in arrays and "sum" not in arrays:
        raise DCDiTError(f"{where} holds neither statistics (mu, sigma) nor images (arr_0)")
    pool = Moments.from_arrays(arrays)
    if pool.mu.size != spec.dims.get("pool"):
        raise DCDiTError(f"{where} holds {pool.mu.size}-dimensional statistics but {spec.name} features have "
                         f"{spec.dims.get('pool')} dimensions (statistics from another extractor?)")
    meta = arrays.get("meta")
    if meta is not None:
        recorded = json.loads(str(meta))
        if recorded.get("extractor", {}).get("weights_sha256") not in (None, spec.weights_sha256):
            warnings.warn(f"{where} was computed with other extractor weights than {spec.weights_path}: "
                          "the distance compares different feature spaces", stacklevel=2)
    spatial = None
    if "mu_s" in arrays or "sum_s" in arrays:
        spatial = Moments.from_arrays(arrays, "s")
    return pool, spatial


def synthetic_source(params: dict) -> ImageSource:
    p = {k: int(params[k]) for k in ("seed", "image_size", "num_classes", "num_samples")}
    identity = {"kind": "synthetic", **p}
    return ImageSource("synthetic", p, identity, p["num_samples"],
                       f"synthetic(seed={p['seed']}, {p['image_size']}px, {p['num_classes']} classes, "
                       f"{p['num_samples']} samples)")


def dataset_source(uri: str, *, crop: int | None) -> ImageSource:
    """A prepared dataset (MANIFEST.json + Parquet shards) or an image folder, as reference images."""
    from dcdit.data.shards import MANIFEST_NAME, read_manifest
    from dcdit_platform.storage import open_storage

    storage = open_storage(uri)
    if not storage.is_local:
        storage.check()
    if storage.exists(MANIFEST_NAME):
        manifest = read_manifest(storage.root, filesystem=storage.filesystem, name=uri)
        if manifest.layout == "pixels":
            raw = storage.read_bytes(MANIFEST_NAME)
            identity = {"kind": "shards", "manifest_sha256": hashlib.sha256(raw).hexdigest()}
            return ImageSource("shards", {"uri": storage.uri}, identity, manifest.num_samples, uri)
        # Latents are not images: compare with the images they were encoded from.
        src = manifest.source
        if src.get("kind") == "synthetic":
            return synthetic_source({**src, "num_samples": src.get("num_samples", manifest.num_samples)})
        if src.get("kind") == "folder" and src.get("path"):
            return dataset_source(src["path"], crop=int(src.get("image_size") or crop or 0) or None)
        raise DCDiTError(f"{uri} holds VAE latents and does not record its source images; pass the image folder "
                         "or an ADM reference batch with --reference")
    if not storage.isdir():
        raise DCDiTError(f"reference {uri} is not an npz file, a prepared dataset or an image folder")
    files = list_images(storage)
    if not files:
        raise DCDiTError(f"reference folder {uri} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    identity = {"kind": "folder", "files": folder_identity(storage, files), "count": len(files),
                "crop": f"adm_center_crop {crop}" if crop else None}
    return ImageSource("folder", {"uri": storage.uri, "files": files, "crop": crop}, identity, len(files), uri)


def reference_key(source_identity: dict, spec: ExtractorSpec, selection: dict) -> str:
    body = {"source": source_identity, "extractor": spec.identity, "selection": selection,
            "version": REFERENCE_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


def reference_selection(size: int, count: int, seed: int = 0) -> np.ndarray:
    """The reference images used: all of them, or a seeded random subset of `count` (in a random order, so any
    prefix is itself a random subset: the first pr_reference_samples serve precision/recall and KID)."""
    order = np.random.default_rng([seed, size]).permutation(size)
    return order[:min(count, size)].astype(np.int64)


# =====================================================================================================================
# Outputs
# =====================================================================================================================

class NpzSampleWriter:
    """Streams an ADM-compatible sample batch: arr_0 uint8 (N, H, W, 3) written shard by shard, arr_1 labels."""

    def __init__(self, path: str, n: int, shape: tuple[int, int, int], labels: np.ndarray):
        from dcdit_platform.storage import open_storage

        self.target = path
        parent, _, self.name = path.rstrip("/").rpartition("/")
        self.storage = open_storage(parent or ".")
        fd, self.tmp = tempfile.mkstemp(suffix=".npz", dir=parent if self.storage.is_local else None)
        os.close(fd)
        self.n, self.shape, self.labels, self.written = n, shape, labels, 0
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.entry = self.zip.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.entry, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                          "fortran_order": False, "shape": (n, *shape)})

    def write(self, images: np.ndarray) -> None:
        self.entry.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        self.written += len(images)

    def close(self) -> str:
        self.entry.close()
        if self.written != self.n:
            raise RuntimeError(f"npz writer got {self.written} of {self.n} images")
        with self.zip.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, self.labels)
        self.zip.close()
        if self.storage.is_local:
            os.replace(self.tmp, self.storage.path(self.name))
        else:
            self.storage.upload(self.tmp, self.name)
            os.unlink(self.tmp)
        return self.target

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.zip.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


# =====================================================================================================================
# The checkpoint
# =====================================================================================================================

def training_reference(config) -> tuple[str, dict | None]:
    """(reference spec, synthetic params or None) of a run's own training data."""
    d = config.data
    if d.is_synthetic:
        return "synthetic", {"kind": "synthetic", "seed": config.data_seed, "image_size": d.image_size,
                             "num_classes": d.num_classes, "num_samples": d.num_samples}
    return d.source, None


# =====================================================================================================================
# The evaluation
# =====================================================================================================================

def _echo(text: str) -> None:
    print(f"dcdit eval: {text}", file=sys.stderr, flush=True)


def evaluate(cfg: EvalConfig, *, on_event: Callable[[dict], None] | None = None,
             echo: Callable[[str], None] = _echo) -> dict:
    """Run the evaluation `cfg` describes and return its summary (also written to storage and MLflow)."""
    from dcdit_platform.storage import open_storage

    cfg.validate()
    started = time.perf_counter()
    ckpt = open_checkpoint(cfg.checkpoint)
    config, model_cfg = ckpt.config, ckpt.config.model
    rhos = cfg.rhos()
    if model_cfg.arch != "dcdit" and (any(r is not None for r in rhos) or cfg.lite_cfg):
        raise DCDiTError("--tail-drop, --tail-drop-sweep and --lite-cfg apply to DC-DiT checkpoints; this one is a "
                         "DiT")
    cfg_scale = cfg.cfg_scale
    if cfg.lite_cfg and cfg_scale == 1.0:
        cfg_scale = 1.25  # the paper's Lite-CFG scale
    if cfg_scale > 1.0 and model_cfg.class_dropout_prob <= 0:
        raise DCDiTError("classifier-free guidance needs a model trained with class dropout "
                         "(model.class_dropout_prob > 0); this one has no null class")
    storage = open_storage(cfg.storage or ckpt.storage_root or config.storage.uri, config.storage.options() or None)
    num_classes, vae, shape, image_size = _generation_geometry(config)

    ref_spec, synthetic_params = (cfg.reference, None) if cfg.reference else training_reference(config)
    if ref_spec == "synthetic" and synthetic_params is None:
        if not config.data.is_synthetic:
            raise DCDiTError("--reference synthetic needs a checkpoint trained on the synthetic data")
        synthetic_params = training_reference(config)[1]
    # The domain classifier is trained on the synthetic data the model learned (else on a synthetic reference).
    domain_source = training_reference(config)[1] or _synthetic_params_of(ref_spec)
    spec, _ = prepare_extractor(cfg.extractor, cfg.weights, storage=storage, domain_source=domain_source, echo=echo)
    metrics = set(cfg.metrics)
    if cfg.extractor != INCEPTION:
        metrics -= {"sfid", "is"}

    import ray

    remote_env = {"env_vars": _worker_env()} if target_address(cfg.address) else None
    with ray_session(cfg.address, log_to_driver=False, runtime_env=remote_env):
        pool = None
        try:
            resources = ray.cluster_resources()
            gpus = int(resources.get("GPU", 0))
            slots = gpus or max(1, int(resources.get("CPU", 1) // cfg.cpus_per_worker))
            workers = cfg.workers or slots
            if workers > slots:
                # More actors than the cluster can hold would wait forever; fewer give the same numbers.
                kind = "GPU" if gpus else "CPU"
                echo(f"--workers {workers} exceeds the cluster's {slots} {kind} slot(s); using {slots}")
                workers = slots
            spec = replace(spec, blob=ray.put(Path(spec.weights_path).read_bytes()) if spec.weights_path else None)
            model_spec = {"config": asdict(model_cfg), "state": ray.put(ckpt.weights), "vae": vae}
            options = {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if gpus else 0, "max_restarts": 0}
            remote = ray.remote(EvalWorker).options(**options)
            threads = max(1, int(cfg.cpus_per_worker))
            pool = ActorPool(workers, lambda: remote.remote(spec, model_spec, threads),
                             max_failures=cfg.max_actor_failures, on_event=on_event)
            echo(f"{workers} actor(s) on {'GPU' if gpus else 'CPU'}; checkpoint {ckpt.uri} (step {ckpt.step})")

            reference = resolve_reference(ref_spec, synthetic_params, spec, storage, pool, cfg, image_size, metrics,
                                          echo=echo)
            runs = []
            for rho in rhos:
                plan = SamplingPlan(sampler=cfg.sampler, steps=cfg.sample_steps,
                                    num_timesteps=config.diffusion.num_timesteps, learn_sigma=model_cfg.learn_sigma,
                                    cfg_scale=cfg_scale, lite_cfg=cfg.lite_cfg, rho=rho,
                                    null_class=model_cfg.num_classes, seed=cfg.seed, num_classes=num_classes,
                                    arch=model_cfg.arch)
                export = cfg.export_npz
                if export and len(rhos) > 1:  # one sample batch per tail-drop fraction: samples-rho0.2.npz
                    export = f"{export[:-4] if export.endswith('.npz') else export}-rho{rho:g}.npz"
                runs.append(_evaluate_plan(cfg, plan, pool, shape, reference, spec, metrics, num_classes,
                                           export=export, echo=echo))
            failures = pool.failures
        finally:
            if pool is not None:
                pool.shutdown()

    protocol = {"checkpoint": ckpt.uri, "step": ckpt.step, "ema": ckpt.used_ema, "num_samples": cfg.num_samples,
                "sampler": cfg.sampler, "steps": cfg.sample_steps, "cfg_scale": cfg_scale,
                "cfg_channels": 3 if cfg_scale > 1.0 else None, "lite_cfg": cfg.lite_cfg, "seed": cfg.seed,
                "num_classes": num_classes, "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
                "extractor": spec.name, "weights_sha256": spec.weights_sha256, "reference": reference.label,
                "reference_id": reference.reference_id, "reference_cached": reference.cached, "vae": vae,
                "image_size": image_size, "labels": "i mod num_classes", "seeds": "SeedSequence([seed, i])"}
    summary: dict[str, Any] = {**protocol, "workers": workers, "actor_failures": failures,
                               "mlflow_run_id": ckpt.mlflow_run_id, "run_name": ckpt.run_name}
    if len(runs) == 1:
        summary.update(runs[0]["metrics"])
        summary["rho"] = rhos[0]
    else:
        summary["rho"] = rhos
        summary["sweep"] = [{"rho": rho, **run["metrics"]} for rho, run in zip(rhos, runs)]
    summary["seconds"] = round(time.perf_counter() - started, 3)
    slug = protocol_slug(protocol, rhos)
    summary["slug"] = slug
    summary["result_uri"] = _write_result(storage, ckpt, slug, summary, runs)
    if cfg.track:
        summary["mlflow_logged"] = log_to_mlflow(cfg, ckpt, config, slug, summary, runs, echo=echo)
    return summary


def _synthetic_params_of(ref_spec: str | None) -> dict | None:
    if ref_spec and ref_spec.startswith("synthetic:"):
        return parse_synthetic(ref_spec)
    return None


def parse_synthetic(text: str) -> dict:
    """'synthetic:seed=0,image_size=32,num_classes=10,num_samples=10000' -> params."""
    params = {"kind": "synthetic", "seed": 0, "image_size": 32, "num_classes": 10, "num_samples": 10_000}
    body = text.split(":", 1)[1] if ":" in text else ""
    for part in filter(None, body.split(",")):
        key, _, value = part.partition("=")
        if key not in params or key == "kind":
            raise DCDiTError(f"unknown synthetic reference option {key!r} in {text!r} "
                             "(seed, image_size, num_classes, num_samples)")
        try:
            params[key] = int(value)
        except ValueError:
            raise DCDiTError(f"synthetic reference option {key}={value!r} must be an integer") from None
    return params


def _worker_env() -> dict[str, str]:
    from dcdit_platform.secrets import secret_env

    return secret_env()


def _generation_geometry(config) -> tuple[int, str | None, tuple[int, int, int], int]:
    """(classes sampled, VAE name or None, model sample shape (C, H, W), image side in pixels)."""
    m = config.model
    shape = (m.in_channels, m.input_size, m.input_size)
    if config.data.is_synthetic:
        return min(config.data.num_classes, m.num_classes), None, shape, m.input_size
    from dcdit.data.shards import read_manifest
    from dcdit_platform.storage import open_storage

    storage = open_storage(config.data.source, config.storage.options() or None)
    try:
        manifest = read_manifest(storage.root, filesystem=storage.filesystem, name=config.data.source)
    except DCDiTError:
        return m.num_classes, None, shape, m.input_size  # the training data is gone; assume pixels
    classes = min(manifest.num_classes, m.num_classes)
    if manifest.layout == "latents":
        vae = manifest.source.get("vae")
        if not vae:
            raise DCDiTError(f"the training data {config.data.source} holds latents but names no VAE to decode them")
        return classes, vae, shape, int(manifest.source.get("image_size") or m.input_size * 8)
    return classes, None, shape, m.input_size


def resolve_reference(ref_spec: str, synthetic_params: dict | None, spec: ExtractorSpec, storage, pool, cfg,
                      image_size: int, metrics: set[str], *, echo=_echo) -> Reference:
    """The reference statistics: from an npz, or computed once from a dataset and cached in storage."""
    want_features = bool(metrics & {"pr", "kid"}) and cfg.pr_reference_samples > 0
    stats_pool = stats_spatial = None
    if ref_spec.lower().endswith(".npz"):
        arrays, sha = _npz_arrays(ref_spec)
        label = ref_spec
        if "mu" in arrays or "sum" in arrays:
            stats_pool, stats_spatial = npz_moments(arrays, ref_spec, spec)
        if "arr_0" not in arrays:
            if want_features:
                warnings.warn(f"{ref_spec} holds statistics only (no arr_0 images): precision, recall and KID are "
                              "skipped", stacklevel=2)
            return Reference(label, f"npz:{sha[:12]}", stats_pool, stats_spatial)
        images = np.asarray(arrays.pop("arr_0"))
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DCDiTError(f"{ref_spec}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} "
                             f"{images.shape}")
        import ray

        source = ImageSource("array", {"array": ray.put(images)}, {"kind": "npz", "sha256": sha}, len(images),
                             ref_spec)
        # ADM batches: mu/sigma describe the whole training set; arr_0 (10K images) serves precision/recall.
        count = len(images) if stats_pool is None else min(len(images), cfg.pr_reference_samples)
        if stats_pool is not None and not want_features:
            return Reference(label, f"npz:{sha[:12]}", stats_pool, stats_spatial)
    elif ref_spec == "synthetic" or ref_spec.startswith("synthetic:"):
        source = synthetic_source(synthetic_params if ref_spec == "synthetic" else parse_synthetic(ref_spec))
        count = min(source.size, cfg.reference_samples)
    else:
        source = dataset_source(ref_spec, crop=image_size)
        count = min(source.size, cfg.reference_samples)
    pr_count = min(count, cfg.pr_reference_samples) if want_features else 0
    selection = {"count": count, "pr_count": pr_count, "order": "seeded permutation [0, size]"}
    key = reference_key(source.identity, spec, selection)
    rel = f"{CACHE_DIR}/fid-references/{key}.npz"
    ref_id = f"{source.identity['kind']}:{key[:12]}"
    if storage.exists(rel):
        arrays, _ = _npz_arrays(storage.join(rel))
        cached_pool = FeatureStats.from_arrays(arrays)
        cached_spatial = FeatureStats.from_arrays(arrays, "s") if "sum_s" in arrays else None
        feats = arrays.get("features")
        echo(f"reference statistics from cache {storage.join(rel)}")
        return Reference(source.label, ref_id, _first(stats_pool, cached_pool), _first(stats_spatial, cached_spatial),
                         feats if feats is not None and len(feats) else None, cached=True, key=key)
    echo(f"computing reference statistics of {count} images of {source.label} (cached afterwards)")
    chosen = reference_selection(source.size, count)
    tasks = []
    for i, (a, b) in enumerate(shards_of(count, cfg.shard_size)):
        idx = chosen[a:b]
        ret = ("pool",) if a < pr_count else ()
        order = np.argsort(idx, kind="stable")  # read in storage order; statistics do not depend on row order
        tasks.append({"kind": "extract", "shard": i, "source": source, "indices": idx[order], "order": order,
                      "batch_size": cfg.batch_size, "return": ret})
    merged = Collected()
    feature_parts = []
    for task, result in zip(tasks, pool.run(tasks)):
        merged.add({"stats": result["stats"]})
        if result.get("pool") is not None:
            restored = np.empty_like(result["pool"])
            restored[task["order"]] = result["pool"]  # back to selection order
            feature_parts.append(restored)
    features = np.concatenate(feature_parts)[:pr_count] if feature_parts else np.zeros((0, spec.dims["pool"]),
                                                                                         np.float32)
    arrays = {**merged.stats["pool"].to_arrays(), "features": features.astype(np.float32),
              "meta": np.array(json.dumps({"source": source.identity, "extractor": spec.identity,
                                           "selection": selection, "label": source.label}))}
    if "spatial" in merged.stats:
        arrays.update(merged.stats["spatial"].to_arrays("s"))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(rel, buffer.getvalue())
    return Reference(source.label, ref_id, _first(stats_pool, merged.stats["pool"]),
                     _first(stats_spatial, merged.stats.get("spatial")), features if len(features) else None, key=key)


def _first(preferred, fallback):
    """An npz's own statistics win over those computed from its images."""
    return preferred if preferred is not None else fallback


def _evaluate_plan(cfg: EvalConfig, plan: SamplingPlan, pool: ActorPool, shape, reference: Reference,
                   spec: ExtractorSpec, metrics: set[str], num_classes: int, *, export: str | None, echo) -> dict:
    started = time.perf_counter()
    want = []
    if metrics & {"pr", "kid"} and reference.features is not None:
        want.append("pool")
    if "is" in metrics or spec.name != INCEPTION:
        want.append("logits")
    tasks = [{"kind": "generate", "shard": i, "start": a, "stop": b, "plan": plan, "shape": shape,
              "batch_size": cfg.batch_size, "return": tuple(want), "count_flops": True,
              "images_below": cfg.num_samples if export else GRID_IMAGES}
             for i, (a, b) in enumerate(shards_of(cfg.num_samples, cfg.shard_size))]
    rho_text = f" rho={plan.rho}" if plan.rho is not None else ""
    echo(f"generating {cfg.num_samples} samples ({plan.sampler} {plan.steps} steps, cfg {plan.cfg_scale}"
         f"{', Lite-CFG' if plan.lite_cfg else ''}{rho_text}) in {len(tasks)} shards")
    writer = None
    merged = Collected()
    grid: list[np.ndarray] = []
    try:
        for result in pool.run(tasks):
            images = result.pop("images", None)
            if images is not None:
                if writer is None and export:
                    writer = NpzSampleWriter(export, cfg.num_samples, images.shape[1:],
                                             sample_labels(np.arange(cfg.num_samples), num_classes))
                if writer is not None:
                    writer.write(images)
                if sum(len(g) for g in grid) < GRID_IMAGES:
                    grid.append(images[:GRID_IMAGES - sum(len(g) for g in grid)])
            merged.add(result)
        exported = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    seconds = time.perf_counter() - started
    values = compute_metrics(merged, reference, spec, metrics, num_classes, cfg.num_samples)
    images_measured = max(merged.flops_images, 1)
    gflops = merged.flops / images_measured / 1e9
    forwards = plan.steps * plan.forwards_per_step()
    values.update({"gflops_per_image": gflops, "gmacs_per_forward": gflops / 2 / forwards,
                   "sampling_seconds": round(seconds, 3), "samples_per_s": round(cfg.num_samples / seconds, 3)})
    if exported:
        values["export_npz"] = exported
    return {"metrics": values, "grid": np.concatenate(grid) if grid else None}


def compute_metrics(merged: Collected, reference: Reference, spec: ExtractorSpec, metrics: set[str],
                    num_classes: int, num_samples: int) -> dict:
    """FID/FD (+ sFID, IS, KID, precision/recall, class accuracy) from merged shard results."""
    out: dict[str, Any] = {}
    distance = "fid" if spec.name == INCEPTION else "fd"
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", BiasedEstimateWarning)
        out[distance] = frechet_distance(merged.stats["pool"], reference.pool, name=distance.upper())
        if "sfid" in metrics and reference.spatial is not None and "spatial" in merged.stats:
            out["sfid"] = frechet_distance(merged.stats["spatial"], reference.spatial, name="sFID")
        logits = merged.array("logits")
        if "is" in metrics and logits is not None and spec.name == INCEPTION:
            out["is_mean"], out["is_std"] = inception_score(logits)
        if spec.name != INCEPTION and logits is not None:
            out["class_accuracy"] = class_accuracy(logits, sample_labels(np.arange(num_samples), num_classes))
        features = merged.array("pool")
        if features is not None and reference.features is not None:
            if "kid" in metrics:
                prefix = "kid" if spec.name == INCEPTION else "kd"
                out[f"{prefix}_mean"], out[f"{prefix}_std"] = kernel_distance(
                    features, reference.features, name=prefix.upper())
            if "pr" in metrics:
                if min(len(features), len(reference.features)) > 3:
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                    out["precision"], out["recall"] = precision_recall(reference.features, features, device=device)
                else:
                    caught.append("precision/recall skipped: needs more than 3 samples on each side")
    caught += [str(w.message) for w in seen if issubclass(w.category, BiasedEstimateWarning)]
    if caught:
        out["warnings"] = sorted(set(caught))
        for message in out["warnings"]:
            print(f"dcdit eval: warning: {message}", file=sys.stderr, flush=True)
    return out


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


def _write_result(storage, ckpt: LoadedCheckpoint, slug: str, summary: dict, runs: list[dict]) -> str:
    """The summary JSON, sample grid PNG(s) and, for a sweep, the elastic-inference curve, next to the run."""
    from dcdit.viz import sample_grid

    base = f"{ckpt.run_name or 'unnamed'}/{RESULTS_DIR}/{ckpt.dirname}/{slug}"
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(runs):
            if run["grid"] is None:
                continue
            suffix = f"-rho{summary['sweep'][i]['rho']:g}" if "sweep" in summary else ""
            path = sample_grid(run["grid"], os.path.join(tmp, f"samples{suffix}.png"))
            storage.write_bytes(f"{base}{suffix}.png", path.read_bytes())
            run["grid_file"] = str(path.name)
            run["grid_uri"] = storage.join(f"{base}{suffix}.png")
        if "sweep" in summary:
            path = elastic_curve(summary, os.path.join(tmp, "elastic_curve.png"))
            storage.write_bytes(f"{base}-curve.png", path.read_bytes())
            summary["curve_uri"] = storage.join(f"{base}-curve.png")
    storage.write_json(f"{base}.json", summary)
    return storage.join(f"{base}.json")


def elastic_curve(summary: dict, path: str) -> Path:
    """FID (or FD) against GFLOPs per image, one point per tail-drop fraction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    name = "fid" if summary["extractor"] == INCEPTION else "fd"
    points = [(e["gflops_per_image"], e[name], e["rho"]) for e in summary["sweep"]]
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for x, y, rho in points:
        ax.annotate(f"rho={rho:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("GFLOPs per image (sampling)")
    ax.set_ylabel(f"{name.upper()} ({summary['num_samples']} samples)")
    ax.set_title("Elastic inference: tail-drop sweep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def log_to_mlflow(cfg: EvalConfig, ckpt: LoadedCheckpoint, config, slug: str, summary: dict, runs: list[dict],
                  *, echo=_echo) -> bool:
    """Metrics (at the checkpoint's step), protocol (as params) and sample grids into the checkpoint's MLflow run,
    under `eval/<slug>/...`; False when the checkpoint records no run. The run's status is left alone (it may
    still be training)."""
    from dcdit_platform.tracking import Tracker, default_tracking_uri

    if not ckpt.mlflow_run_id:
        echo("warning: the checkpoint records no MLflow run (state.json mlflow_run_id); results are in storage only")
        return False
    uri = cfg.tracking_uri or (config.tracking.uri if config.tracking.uri and "***" not in config.tracking.uri
                               else None)
    if uri is None:
        if config.storage.is_s3:
            raise DCDiTError("the run's MLflow server is not recorded without credentials: pass --tracking-uri")
        uri = default_tracking_uri(config.storage.uri)
    tracker = Tracker(uri, retry_timeout_s=config.tracking.retry_timeout_s)
    run_id = ckpt.mlflow_run_id
    tracker.get_run(run_id)  # a one-line error when the server does not know the run
    prefix = f"eval/{slug}"
    params = {f"{prefix}/{k}": v for k, v in summary.items() if k in PROTOCOL_PARAMS}
    tracker.log_params(run_id, params)
    entries = summary["sweep"] if "sweep" in summary else [summary]
    for entry in entries:
        sub = f"{prefix}/rho{entry['rho']:g}" if "sweep" in summary else prefix
        numbers = {f"{sub}/{k}": v for k, v in entry.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in PROTOCOL_PARAMS
                   and k not in ("rho", "step", "workers", "actor_failures") and math.isfinite(float(v))}
        tracker.log_metrics(run_id, numbers, int(ckpt.step or 0))
    with tempfile.TemporaryDirectory() as tmp:
        from dcdit.viz import sample_grid

        for run in runs:
            if run["grid"] is not None:
                tracker.log_artifact(run_id, sample_grid(run["grid"], os.path.join(tmp, run["grid_file"])), prefix)
        if "sweep" in summary:
            tracker.log_artifact(run_id, elastic_curve(summary, os.path.join(tmp, "elastic_curve.png")), prefix)
    tracker.log_text(run_id, json.dumps(summary, indent=1, sort_keys=True, default=str), f"{prefix}/result.json")
    return True


PROTOCOL_PARAMS = ("checkpoint", "num_samples", "sampler", "steps", "cfg_scale", "cfg_channels", "lite_cfg", "seed",
                   "num_classes", "batch_size", "shard_size", "extractor", "weights_sha256", "reference",
                   "reference_id", "vae", "image_size", "ema", "rho")


# =====================================================================================================================
# `dcdit fid`: two inputs, in process
# =====================================================================================================================

@dataclass
class FidInput:
    label: str
    kind: str  # "images" | "stats"
    pool: Moments | FeatureStats | None = None
    spatial: Moments | FeatureStats | None = None
    n: int | None = None


def fid_input(path: str, extractor, spec: ExtractorSpec, *, batch_size: int = 64) -> FidInput:
    """Statistics of an image folder, a sample npz (arr_0 uint8 NHWC) or a statistics npz."""
    from dcdit_platform.storage import open_storage

    if path.lower().endswith(".npz"):
        arrays, _ = _npz_arrays(path)
        if "arr_0" in arrays and "mu" not in arrays and "sum" not in arrays:
            images = arrays["arr_0"]
            if images.dtype != np.uint8 or images.ndim != 4:
                raise DCDiTError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
            stats = _stats_of_batches((images[i:i + batch_size] for i in range(0, len(images), batch_size)),
                                      extractor)
            return FidInput(path, "images", stats.get("pool"), stats.get("spatial"), len(images))
        pool, spatial = npz_moments(arrays, path, spec)
        return FidInput(path, "stats", pool, spatial, pool.n)
    storage = open_storage(path)
    if not storage.isdir():
        raise DCDiTError(f"{path} is neither an image folder nor an npz file")
    files = list_images(storage)
    if not files:
        raise DCDiTError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    batches = _same_size_batches(storage, files, batch_size)
    stats = _stats_of_batches(batches, extractor)
    return FidInput(path, "images", stats.get("pool"), stats.get("spatial"), len(files))


def _same_size_batches(storage, files: list[str], batch_size: int) -> Iterator[np.ndarray]:
    """Batches of decoded images; a batch ends early where the image size changes."""
    from PIL import Image

    batch: list[np.ndarray] = []
    for rel in files:
        with storage.open_input(rel) as f:
            image = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)


def _stats_of_batches(batches, extractor) -> dict[str, FeatureStats]:
    stats: dict[str, FeatureStats] = {}
    for images in batches:
        feats = extractor(images)
        for key in ("pool", "spatial"):
            if key in feats:
                stats.setdefault(key, FeatureStats.empty(feats[key].shape[1])).update(feats[key])
    return stats


def fid_between(input1: str, input2: str, *, extractor: str = INCEPTION, weights: str | None = None,
                batch_size: int = 64, save_stats: str | None = None) -> dict:
    """FID (FD for other extractors; sFID when both sides have spatial statistics) between two inputs."""

    if extractor == DOMAIN_EXTRACTOR and weights is None:
        raise DCDiTError(f"--extractor {DOMAIN_EXTRACTOR} needs --weights (the classifier file cached by `dcdit "
                         f"eval` under {{storage}}/{CACHE_DIR}/extractors/)")
    spec, ex = prepare_extractor(extractor, weights, build=True)
    ex.batch_size = batch_size
    sides = [fid_input(p, ex, spec, batch_size=batch_size) for p in (input1, input2)]
    name = "fid" if extractor == INCEPTION else "fd"
    out: dict[str, Any] = {"input1": input1, "input2": input2, "extractor": spec.name,
                           "weights_sha256": spec.weights_sha256, "n1": sides[0].n, "n2": sides[1].n}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", BiasedEstimateWarning)
        out[name] = frechet_distance(sides[0].pool, sides[1].pool, name=name.upper())
        if sides[0].spatial is not None and sides[1].spatial is not None:
            out["sfid"] = frechet_distance(sides[0].spatial, sides[1].spatial, name="sFID")
    messages = sorted({str(w.message) for w in seen if issubclass(w.category, BiasedEstimateWarning)})
    if messages:
        out["warnings"] = messages
    if save_stats:
        side = sides[0]
        if not isinstance(side.pool, FeatureStats):
            raise DCDiTError("--save-stats saves the statistics of INPUT1, which must be images")
        save_statistics(save_stats, side.pool, side.spatial, spec)
        out["saved_stats"] = save_stats
    return out


def save_statistics(path: str, pool: FeatureStats, spatial: FeatureStats | None, spec: ExtractorSpec) -> None:
    """An npz with the sums and ADM-compatible mu/sigma (mu_s/sigma_s), plus what computed them."""
    from dcdit_platform.storage import open_storage

    arrays = {**pool.to_arrays(), "meta": np.array(json.dumps({"extractor": spec.identity}))}
    if spatial is not None:
        arrays.update(spatial.to_arrays("s"))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    parent, _, name = path.rstrip("/").rpartition("/")
    open_storage(parent or ".").write_bytes(name, buffer.getvalue())


__all__ = ["EvalConfig", "evaluate", "fid_between", "sample_seed", "sample_labels", "quantize", "SamplingPlan",
           "generate", "EvalWorker", "ActorPool", "reference_key", "reference_selection", "protocol_slug",
           "NpzSampleWriter", "save_statistics", "ALL_METRICS", "shards_of"]
