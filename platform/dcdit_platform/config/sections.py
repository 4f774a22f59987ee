"""The sections of an experiment config: typed, frozen, each with its own range checks (`validate`).

`ExperimentConfig` (dcdit_platform.config.experiment) holds one of each plus the model and the cross-section rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dcdit.errors import DCDiTError, shown
from dcdit.objective import ChunkingLossConfig
from dcdit_platform.secrets import redact

Precision = Literal["fp32", "bf16"]
SYNTHETIC = "synthetic"
MAX_SEED = 2**32 - 1  # what every RNG the runs seed takes (numpy, torch, Python)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


@dataclass(frozen=True, kw_only=True)
class DiffusionSection:
    """The Gaussian diffusion trained against (the paper: linear betas, 1000 steps, learned sigma from the model)."""

    num_timesteps: int = 1000
    noise_schedule: Literal["linear"] = "linear"

    def validate(self) -> None:
        _within("diffusion.num_timesteps", self.num_timesteps, 2, 100_000)


# The synthetic images' side in every shipped config (experiments/quickstart, smoke): also the default of configs,
# `dcdit prepare-data synthetic` and synthetic evaluation references, so that their outputs fit together.
DEFAULT_IMAGE_SIZE = 16


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Where training samples come from: the embedded synthetic dataset or prepared Parquet shards (local or s3://)."""

    source: str = SYNTHETIC  # "synthetic" or the URI of a dataset written by `dcdit prepare-data`
    image_size: int = DEFAULT_IMAGE_SIZE  # synthetic only
    num_classes: int = 10  # synthetic only
    num_samples: int = 10_000  # synthetic only
    seed: int | None = None  # sample order (and synthetic content); None = the experiment's seed
    shuffle: bool = True
    shuffle_window: int | None = None  # shards visited k at a time (datasets larger than memory); None = global
    prefetch: int = 4  # batches prepared ahead by the reader's thread

    @property
    def is_synthetic(self) -> bool:
        return self.source == SYNTHETIC

    def sets_synthetic_options(self) -> bool:
        defaults = DataSection()
        return any(getattr(self, k) != getattr(defaults, k) for k in ("image_size", "num_classes", "num_samples"))

    def validate(self) -> None:
        _require(bool(self.source), "data.source", self.source, "must be 'synthetic' or a dataset URI")
        if self.is_synthetic:
            _require(8 <= self.image_size <= 1024, "data.image_size", self.image_size, "must be in [8, 1024]")
            _require(1 <= self.num_classes <= 12, "data.num_classes", self.num_classes,
                     "must be in [1, 12] (the synthetic dataset has 12 classes)")
            _within("data.num_samples", self.num_samples, 1, 10**9)
        _within("data.seed", self.seed, 0, MAX_SEED)
        _within("data.shuffle_window", self.shuffle_window, 1, 10**6)
        _within("data.prefetch", self.prefetch, 1, 1024)


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    """Optimisation (AdamW, EMA, clipping, accumulation, precision), the router's losses and upcycling."""

    steps: int  # optimizer steps of the whole run (raising it and resuming continues a run)
    global_batch: int = 256  # samples per optimizer step over all workers and accumulation micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step on each worker
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from 0 to lr; the paper uses a constant lr
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    ema_decay: float = 0.9999
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    precision: Precision = "fp32"  # bf16: autocast; the router and de-chunk stay in fp32 inside the model
    chunking: ChunkingLossConfig = field(default_factory=ChunkingLossConfig)
    # Upcycling (arXiv 2603.06351 v1): a DC-DiT initialised from a pretrained DiT.
    init_from: str | None = None  # DiT checkpoint file, diffusers directory or hub name
    freeze_embedders: bool = True  # keep the DiT's timestep and class embedders fixed
    cond_adaptor: bool = True  # trainable LayerNorm on the conditioning fed to the encoder/decoder
    distill_steps: int = 0  # warm-up steps with the block-output distillation term (the paper: 5000)
    distill_weight: float = 1.0  # weight of that term during the warm-up

    def validate(self) -> None:
        _within("train.steps", self.steps, 1, 10**9)
        _within("train.global_batch", self.global_batch, 1, 2**20)
        _within("train.grad_accum", self.grad_accum, 1, 2**20)
        _require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _within("train.warmup_steps", self.warmup_steps, 0, 10**9)
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", list(self.betas),
                 "must be two numbers in [0, 1)")
        _require(self.eps > 0, "train.eps", self.eps, "must be > 0")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "must be in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _within("train.distill_steps", self.distill_steps, 0, 10**9)
        _require(self.distill_weight >= 0, "train.distill_weight", self.distill_weight, "must be >= 0")
        _require(self.distill_steps == 0 or self.init_from, "train.distill_steps", self.distill_steps,
                 "needs train.init_from (the pretrained DiT is the teacher)")


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    """Checkpoints every `every` steps (and at the end), the last `keep` kept; worker failures retried; a storage
    write that fails is retried with back-off for `upload_timeout_s` while the checkpoint waits on local disk."""

    every: int = 1000
    keep: int = 3
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails; -1 = no limit
    upload_timeout_s: float = 600.0  # how long a failing storage write is retried before the run stops

    def validate(self) -> None:
        _within("checkpoint.every", self.every, 1, 10**9)
        _within("checkpoint.keep", self.keep, 1, 10_000)
        _within("checkpoint.max_failures", self.max_failures, -1, 1000)
        _require(0 <= self.upload_timeout_s <= 86_400, "checkpoint.upload_timeout_s", self.upload_timeout_s,
                 "must be in [0, 86400] seconds")


@dataclass(frozen=True, kw_only=True)
class LoggingSection:
    """Step metrics every `every` steps; boundary maps and a sample grid every `artifacts_every` steps."""

    every: int = 100
    artifacts_every: int = 0  # 0 = only at the end of the run, -1 = never
    sample_count: int = 8  # images in the sample grid (classes 0, 1, ...)
    sample_steps: int = 25  # DDIM steps used to draw them (with the EMA weights)

    def validate(self) -> None:
        _within("logging.every", self.every, 1, 10**9)
        _require(self.artifacts_every >= -1, "logging.artifacts_every", self.artifacts_every,
                 "must be >= -1 (0 = only at the end, -1 = never)")
        _within("logging.sample_count", self.sample_count, 1, 1024)
        _within("logging.sample_steps", self.sample_steps, 1, 10_000)


@dataclass(frozen=True, kw_only=True)
class EvaluationSection:
    """Evaluation during training: every `every` steps (0 = never) the EMA weights of that step's checkpoint are
    scored in the background under this protocol (the fields are `dcdit eval`'s EvalConfig fields of the same
    name, checked by it when the run is planned), logged as eval/fd (eval/fid with Inception) at that step."""

    every: int = 0  # a multiple of checkpoint.every: an evaluation scores a saved checkpoint
    num_samples: int = 10_000  # FID-10K, the usual in-training monitor (the paper's final numbers are FID-50K)
    sampler: str = "ddpm"
    sample_steps: int = 250
    cfg_scale: float = 1.0
    reference: str | None = None  # None = the training data
    extractor: str | None = None  # None: the domain classifier on synthetic data, else Inception
    weights: str | None = None
    seed: int = 0
    batch_size: int = 64
    shard_size: int = 1024
    workers: int | None = 1  # evaluation actors; they share the cluster with the training workers
    cpus_per_worker: float = 1.0
    metrics: tuple[str, ...] = ("fid",)  # FID (FD with the domain classifier); add is, kid, pr, sfid if needed

    def validate(self) -> None:
        _within("evaluation.every", self.every, 0, 10**9)
        _require(0 < self.cpus_per_worker <= 1024, "evaluation.cpus_per_worker", self.cpus_per_worker,
                 "must be in (0, 1024]")


@dataclass(frozen=True, kw_only=True)
class ResourcesSection:
    """Ray Train workers (one DDP rank each) and what each one reserves. `num_workers: [min, max]` is elastic: Ray
    Train starts with as many as it can get (at least min), restarts the group from the latest checkpoint when
    workers are lost or more become available, and training ends with the same weights up to float summation
    order (README, "Reproducibility")."""

    num_workers: int | tuple[int, ...] = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu
    torch_threads: int | None = None  # CPU intra-op threads per worker; None = cpus_per_worker (at least 1)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[-1]

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may train with."""
        return range(self.min_workers, self.max_workers + 1)

    def ray_workers(self) -> int | tuple[int, int]:
        """ScalingConfig(num_workers=...): a fixed count, or (min, max) for Ray Train's elastic scaling."""
        return self.min_workers if self.min_workers == self.max_workers else (self.min_workers, self.max_workers)

    def validate(self) -> None:
        if not isinstance(self.num_workers, int):
            _require(len(self.num_workers) == 2 and self.num_workers[0] <= self.num_workers[1],
                     "resources.num_workers", list(self.num_workers),
                     "must be a count or a range [min, max] with min <= max")
        _within("resources.num_workers", self.min_workers, 1, 10_000)
        _within("resources.num_workers", self.max_workers, 1, 10_000)
        _require(0 < self.cpus_per_worker <= 1024, "resources.cpus_per_worker", self.cpus_per_worker,
                 "must be in (0, 1024]")
        _require(0 < self.gpus_per_worker <= 64, "resources.gpus_per_worker", self.gpus_per_worker,
                 "must be in (0, 64]")
        _within("resources.torch_threads", self.torch_threads, 1, 1024)


@dataclass(frozen=True, kw_only=True)
class StorageSection:
    """The storage root of runs (checkpoints, Ray Train state): a local path or s3://bucket/prefix.

    S3 settings left unset come from the standard AWS environment variables (preferred for keys).
    """

    uri: str = "./dcdit-runs"
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    region: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def options(self) -> dict[str, Any]:
        """The StorageOptions of `dcdit_platform.storage` that this section sets."""
        keys = ("endpoint_url", "access_key_id", "secret_access_key", "session_token", "region")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def validate(self) -> None:
        _require(bool(self.uri), "storage.uri", self.uri, "must be a local path or s3://bucket/prefix")
        if "://" in self.uri and not self.uri.startswith(("s3://", "file://")):
            raise DCDiTError(f"storage.uri={self.uri!r} has an unsupported scheme; use a local path, file:// or "
                             "s3://bucket/prefix")


@dataclass(frozen=True, kw_only=True)
class TrackingSection:
    """MLflow: the tracking URI (default: sqlite in the local storage root), experiment, parent run, retries."""

    uri: str | None = None  # http(s)://server, sqlite:////abs/mlflow.db, ...; required with s3:// storage
    experiment: str = "dcdit"
    parent_run_id: str | None = None  # sweeps: the parent run this run is a child of
    retry_timeout_s: float = 300.0  # how long an unreachable server is retried before the run stops
    tags: dict[str, Any] = field(default_factory=dict)  # extra run tags
    # The final EMA weights as the run's MLflow model (a pyfunc LoggedModel holding a `dcdit export` directory): on
    # by default, as `dcdit register` and `models:/` URIs start from it; it costs one export and one upload of the
    # weights at the end of a run (about 0.5 s for the tests' tiny models, measured with a SQLite store on the
    # loaded 2-core machine; more for large weights), so sweeps of large models may turn it off.
    log_model: bool = True

    def validate(self) -> None:
        if self.uri is not None:
            scheme = self.uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in self.uri else ""
            if scheme == "file" or "://" not in self.uri:
                raise DCDiTError(f"tracking.uri={_safe(self.uri)!r}: MLflow's file store is disabled since MLflow "
                                 "3.13; use sqlite:////absolute/path/mlflow.db or an http(s):// tracking server")
            _require(scheme in TRACKING_SCHEMES, "tracking.uri", _safe(self.uri),
                     f"has an unsupported scheme; use one of {', '.join(TRACKING_SCHEMES)}")
        _require(bool(self.experiment), "tracking.experiment", self.experiment, "must be a non-empty name")
        _require(0 <= self.retry_timeout_s <= 86_400, "tracking.retry_timeout_s", self.retry_timeout_s,
                 "must be in [0, 86400] seconds")
        for key, value in self.tags.items():
            _require(isinstance(value, (str, int, float, bool)), f"tracking.tags.{key}", value,
                     "must be a string, number or boolean")


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise DCDiTError(f"{key}={shown(value)} {rule}")


def _within(key: str, value: int | None, low: int, high: int) -> None:
    """Integers outside [low, high] are typos, not experiments; None means unset."""
    _require(value is None or low <= value <= high, key, value, f"must be in [{low}, {high}]")


def _safe(uri: str) -> str:
    return redact(uri)
