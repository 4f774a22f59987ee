"""The experiment config tree: typed sections built strictly from YAML (with `_base_` inheritance) and dotted
command-line overrides, validated before any work starts, plus the config hash that guards resumption.

One `ExperimentConfig` describes one training run: model, diffusion, data, optimisation, checkpoints, logging,
resources, storage and tracking. Everything is checked here (unknown keys with a "did you mean", types, ranges,
cross-section rules) so that a bad config fails in a second instead of after Ray has started.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dcdit.config import ModelConfig, from_dict, preset
from dcdit.errors import DCDiTError, did_you_mean
from dcdit.objective import ChunkingLossConfig

Precision = Literal["fp32", "bf16"]
SYNTHETIC = "synthetic"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


@dataclass(frozen=True, kw_only=True)
class DiffusionSection:
    """The Gaussian diffusion trained against (the paper: linear betas, 1000 steps, learned sigma from the model)."""

    num_timesteps: int = 1000
    noise_schedule: Literal["linear"] = "linear"

    def validate(self) -> None:
        _require(self.num_timesteps >= 2, "diffusion.num_timesteps", self.num_timesteps, "must be >= 2")


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Where training samples come from: the embedded synthetic dataset or prepared Parquet shards (local or s3://)."""

    source: str = SYNTHETIC  # "synthetic" or the URI of a dataset written by `dcdit prepare-data`
    image_size: int = 32  # synthetic only
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
            _require(self.num_samples >= 1, "data.num_samples", self.num_samples, "must be >= 1")
        _require(self.seed is None or self.seed >= 0, "data.seed", self.seed, "must be >= 0")
        _require(self.shuffle_window is None or self.shuffle_window >= 1, "data.shuffle_window",
                 self.shuffle_window, "must be >= 1 shard or null")
        _require(self.prefetch >= 1, "data.prefetch", self.prefetch, "must be >= 1")


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
        _require(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _require(self.global_batch >= 1, "train.global_batch", self.global_batch, "must be >= 1")
        _require(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", list(self.betas),
                 "must be two numbers in [0, 1)")
        _require(self.eps > 0, "train.eps", self.eps, "must be > 0")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "must be in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _require(self.distill_steps >= 0, "train.distill_steps", self.distill_steps, "must be >= 0")
        _require(self.distill_weight >= 0, "train.distill_weight", self.distill_weight, "must be >= 0")
        _require(self.distill_steps == 0 or self.init_from, "train.distill_steps", self.distill_steps,
                 "needs train.init_from (the pretrained DiT is the teacher)")


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    """Checkpoints every `every` steps (and at the end), the last `keep` kept; worker failures retried."""

    every: int = 1000
    keep: int = 3
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails; -1 = no limit

    def validate(self) -> None:
        _require(self.every >= 1, "checkpoint.every", self.every, "must be >= 1")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")
        _require(self.max_failures >= -1, "checkpoint.max_failures", self.max_failures, "must be >= -1")


@dataclass(frozen=True, kw_only=True)
class LoggingSection:
    """Step metrics every `every` steps; boundary maps and a sample grid every `artifacts_every` steps."""

    every: int = 100
    artifacts_every: int = 0  # 0 = only at the end of the run, -1 = never
    sample_count: int = 8  # images in the sample grid (classes 0, 1, ...)
    sample_steps: int = 25  # DDIM steps used to draw them (with the EMA weights)

    def validate(self) -> None:
        _require(self.every >= 1, "logging.every", self.every, "must be >= 1")
        _require(self.artifacts_every >= -1, "logging.artifacts_every", self.artifacts_every,
                 "must be >= -1 (0 = only at the end, -1 = never)")
        _require(self.sample_count >= 1, "logging.sample_count", self.sample_count, "must be >= 1")
        _require(self.sample_steps >= 1, "logging.sample_steps", self.sample_steps, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ResourcesSection:
    """Ray Train workers (one DDP rank each) and what each one reserves."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu
    torch_threads: int | None = None  # CPU intra-op threads per worker; None = cpus_per_worker (at least 1)

    def validate(self) -> None:
        _require(self.num_workers >= 1, "resources.num_workers", self.num_workers, "must be >= 1")
        _require(self.cpus_per_worker > 0, "resources.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _require(self.gpus_per_worker > 0, "resources.gpus_per_worker", self.gpus_per_worker, "must be > 0")
        _require(self.torch_threads is None or self.torch_threads >= 1, "resources.torch_threads",
                 self.torch_threads, "must be >= 1 or null")


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

    def validate(self) -> None:
        if self.uri is not None:
            scheme = self.uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in self.uri else ""
            if scheme == "file" or "://" not in self.uri:
                raise DCDiTError(f"tracking.uri={_safe(self.uri)!r}: MLflow's file store is disabled since MLflow "
                                 "3.13; use sqlite:////absolute/path/mlflow.db or an http(s):// tracking server")
            _require(scheme in TRACKING_SCHEMES, "tracking.uri", _safe(self.uri),
                     f"has an unsupported scheme; use one of {', '.join(TRACKING_SCHEMES)}")
        _require(bool(self.experiment), "tracking.experiment", self.experiment, "must be a non-empty name")
        _require(self.retry_timeout_s >= 0, "tracking.retry_timeout_s", self.retry_timeout_s, "must be >= 0")
        for key, value in self.tags.items():
            _require(isinstance(value, (str, int, float, bool)), f"tracking.tags.{key}", value,
                     "must be a string, number or boolean")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One training run, fully resolved and validated."""

    model: ModelConfig
    train: TrainSection
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    seed: int = 0
    name: str | None = None  # the run name; --name overrides; None = <config file stem>-<config hash>
    model_preset: str | None = None  # the preset `model` was built from, when it was (informational)

    # --- derived -------------------------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        """Samples per forward/backward on one worker."""
        return self.train.global_batch // (self.resources.num_workers * self.train.grad_accum)

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    @property
    def is_upcycling(self) -> bool:
        return self.train.init_from is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able form; `build_config(cfg.to_dict())` gives back an equal config."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        out["model"] = {**({"preset": self.model_preset} if self.model_preset else {}), **out["model"]}
        del out["model_preset"]
        return out

    def science_dict(self) -> dict[str, Any]:
        """The part of the config that determines what is trained (see `RESUME_FREE_KEYS`)."""
        data = self.to_dict()
        data["model"].pop("preset", None)
        for dotted in RESUME_FREE_KEYS:
            node, *rest = dotted.split(".")
            if not rest:
                data.pop(node, None)
            else:
                data[node].pop(rest[0], None)
        return data

    def config_hash(self) -> str:
        from dcdit.checkpoint import config_hash

        return config_hash(self.science_dict())

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    # --- checks ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        t, r, m, d = self.train, self.resources, self.model, self.data
        per_step = r.num_workers * t.grad_accum
        if t.global_batch % per_step:
            raise DCDiTError(f"train.global_batch={t.global_batch} must be divisible by resources.num_workers x "
                             f"train.grad_accum = {r.num_workers} x {t.grad_accum} = {per_step}")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        if self.name is not None:
            check_run_name(self.name, "name")
        if d.is_synthetic:
            if m.in_channels != 3:
                raise DCDiTError(f"model.in_channels={m.in_channels} but the synthetic data is RGB pixels: "
                                 "set model.in_channels=3")
            if m.input_size != d.image_size:
                raise DCDiTError(f"model.input_size={m.input_size} but data.image_size={d.image_size}; "
                                 "make them equal")
            if d.num_classes > m.num_classes:
                raise DCDiTError(f"data.num_classes={d.num_classes} exceeds model.num_classes={m.num_classes}")
            if d.num_samples < t.global_batch:
                raise DCDiTError(f"data.num_samples={d.num_samples} is smaller than one step "
                                 f"(train.global_batch={t.global_batch})")
        if self.is_upcycling and m.arch != "dcdit":
            raise DCDiTError(f"train.init_from upcycles a DiT into a DC-DiT, but model.arch={m.arch!r}; "
                             "choose a DC-DiT model (e.g. model.preset: DC-DiT-XL)")
        if self.storage.is_s3 and self.tracking.uri is None:
            raise DCDiTError(f"storage {self.storage.uri} is on S3, so the run needs an MLflow tracking server: "
                             "pass --tracking-uri http://HOST:PORT (or set tracking.uri); the default SQLite "
                             "store lives in local storage only")

    def warnings(self) -> list[str]:
        """Options that are set but have no effect in this config (torchtitan's rule: say so)."""
        out = []
        t = self.train
        if not self.is_upcycling:
            if t.distill_weight != 1.0:
                out.append("train.distill_weight has no effect without train.init_from")
        if self.model.arch == "dit" and (t.chunking.multi_budget or t.chunking.curriculum_start is not None):
            out.append("train.chunking applies to DC-DiT only; this DiT baseline ignores it")
        if not self.data.is_synthetic and self.data.sets_synthetic_options():
            out.append("data.image_size/num_classes/num_samples apply to the synthetic source only")
        if not self.resources.use_gpu and self.resources.gpus_per_worker != 1.0:
            out.append("resources.gpus_per_worker has no effect without resources.use_gpu")
        return out


# Keys that may change between a run and its resumption: how long, how it is checkpointed, logged, placed,
# stored and tracked, and how the global batch is split into micro-steps (the loop seeds every micro-batch by
# its position in the global batch, so workers x grad_accum only changes float summation order). Everything
# else (model, diffusion, data, optimiser, losses, precision, upcycling, seed) is "the science": a resume with
# a different value would silently train something else, so it is refused.
RESUME_FREE_KEYS = ("name", "train.steps", "train.grad_accum", "checkpoint", "logging", "resources", "storage",
                    "tracking", "data.prefetch")

_SECTIONS: dict[str, type] = {
    "train": TrainSection, "diffusion": DiffusionSection, "data": DataSection, "checkpoint": CheckpointSection,
    "logging": LoggingSection, "resources": ResourcesSection, "storage": StorageSection,
    "tracking": TrackingSection,
}
_TOP_LEVEL = ("model", *_SECTIONS, "seed", "name")


def build_config(data: dict[str, Any]) -> ExperimentConfig:
    """An `ExperimentConfig` from a plain dict (YAML after `_base_` and overrides), checked strictly."""
    if not isinstance(data, dict):
        raise DCDiTError(f"an experiment config must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_LEVEL:
            raise DCDiTError(f"unknown config key '{key}'{did_you_mean(str(key), _TOP_LEVEL)}")
    if "model" not in data:
        raise DCDiTError("missing required config key 'model' (a preset such as 'DC-DiT-B' or full fields)")
    if "train" not in data or not isinstance(data["train"], dict) or "steps" not in data["train"]:
        raise DCDiTError("missing required config key 'train.steps'")
    model, model_preset = build_model_config(data["model"])
    sections = {name: from_dict(cls, _section(data, name), prefix=name) for name, cls in _SECTIONS.items()}
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DCDiTError(f"seed={seed!r} must be an integer")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise DCDiTError(f"name={name!r} must be a string")
    train = sections["train"]
    if train.init_from is not None and model.arch == "dcdit" and model.cond_adaptor != train.cond_adaptor:
        # Upcycling decides the adaptor; recording it in the model keeps one source of truth for the hash.
        model = model.replace(cond_adaptor=train.cond_adaptor)
    config = ExperimentConfig(model=model, seed=seed, name=name, model_preset=model_preset, **sections)
    config.validate()
    return config


def build_model_config(data: Any) -> tuple[ModelConfig, str | None]:
    """`model:` is {preset: NAME, **overrides} or the full ModelConfig fields."""
    if isinstance(data, str):
        data = {"preset": data}
    if not isinstance(data, dict):
        raise DCDiTError(f"model must be a preset name or a mapping, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("preset", None)
    if name is not None:
        if not isinstance(name, str):
            raise DCDiTError(f"model.preset={name!r} must be a string such as 'DC-DiT-B'")
        return preset(name, **data), name
    return from_dict(ModelConfig, data, prefix="model"), None


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DCDiTError(f"{name} must be a mapping of keys to values, got {type(value).__name__}")
    return value


def check_run_name(name: str, where: str = "--name") -> str:
    if not RUN_NAME.fullmatch(name):
        raise DCDiTError(f"{where}={name!r} is not a valid run name: use letters, digits, '.', '_' and '-' "
                         "(at most 128, starting with a letter or digit)")
    return name


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise DCDiTError(f"{key}={value!r} {rule}")


def _safe(uri: str) -> str:
    from dcdit_platform.tracking import redact

    return redact(uri)


# --- YAML files, inheritance and overrides ------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; configs are full of such numbers, so read them as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str, where: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DCDiTError(f"cannot parse {where}{at}: {problem}") from None


def load_yaml_tree(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its `_base_` file(s) merged underneath (paths relative to the including file)."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise DCDiTError(f"config inheritance loops: {chain}")
    if not path.is_file():
        raise DCDiTError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DCDiTError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        if not isinstance(base, str):
            raise DCDiTError(f"{path}: _base_ must be a file name or a list of them, got {base!r}")
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are YAML (`train.betas=[0.9,0.95]`, `train.init_from=null`)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise DCDiTError(f"override {item!r} must look like section.key=value (e.g. train.lr=2e-4)")
        value = parse_yaml(raw, f"override {key}") if raw.strip() else ""
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                if parts[0] == "model" and depth == 0 and isinstance(child, str):
                    child = node[part] = {"preset": child}
                else:
                    raise DCDiTError(f"override {key}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_experiment(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                    data: dict[str, Any] | None = None) -> ExperimentConfig:
    """The validated config of YAML file `path` (or of the dict `data`) with dotted `overrides` applied."""
    if (path is None) == (data is None):
        raise ValueError("pass exactly one of path and data")
    tree = load_yaml_tree(path) if path is not None else copy.deepcopy(data)
    return build_config(apply_overrides(tree, overrides))


def default_run_name(config: ExperimentConfig, config_path: str | os.PathLike | None) -> str:
    """`name` from the config, else <file stem>-<first 8 hex of the config hash>: stable, so re-running the same
    command resumes the same run (never a timestamp)."""
    if config.name:
        return config.name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(config_path).stem if config_path else "run").strip("-._") or "run"
    return check_run_name(f"{stem[:100]}-{config.config_hash()[:8]}", "name")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def science_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two `science_dict()`s (for the refusal message)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


__all__ = ["ExperimentConfig", "TrainSection", "DiffusionSection", "DataSection", "CheckpointSection",
           "LoggingSection", "ResourcesSection", "StorageSection", "TrackingSection", "RESUME_FREE_KEYS",
           "build_config", "build_model_config", "load_experiment", "load_yaml_tree", "apply_overrides",
           "deep_merge", "parse_yaml", "default_run_name", "check_run_name", "flatten", "science_diff"]
