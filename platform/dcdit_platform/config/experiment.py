"""One training run's config: `ExperimentConfig` (model + sections), built strictly from a config tree, the keys
that may change on resume, the config hash that guards resumption, and the check of dotted keys against the schema.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcdit.checkpoint import config_hash
from dcdit.config import ModelConfig, from_dict, preset
from dcdit.errors import DCDiTError, did_you_mean
from dcdit.models import family_of
from dcdit_platform.config.sections import (MAX_SEED, RUN_NAME, CheckpointSection, DataSection, DiffusionSection,
                                            EvaluationSection, LoggingSection, ResourcesSection, StorageSection,
                                            TrackingSection, TrainSection, _require)
from dcdit_platform.config.tree import apply_overrides, flatten, load_yaml_tree

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
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    seed: int = 0
    name: str | None = None  # the run name; --name overrides; None = <config file stem>-<config hash>
    model_preset: str | None = None  # the preset `model` was built from, when it was (informational)

    # --- derived -------------------------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        """Samples per forward/backward on one worker (the largest, with the fewest workers of an elastic range)."""
        return self.train.global_batch // (self.resources.min_workers * self.train.grad_accum)

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
        return config_hash(self.science_dict())

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    # --- checks ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        t, r, m, d = self.train, self.resources, self.model, self.data
        for workers in r.worker_counts:
            per_step = workers * t.grad_accum
            if t.global_batch % per_step:
                within = f" (every count of the range {list(r.num_workers)})" if workers != r.num_workers else ""
                raise DCDiTError(f"train.global_batch={t.global_batch} must be divisible by resources.num_workers"
                                 f"{within} x train.grad_accum = {workers} x {t.grad_accum} = {per_step}")
        _require(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"must be in [0, {MAX_SEED}]")
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
        if self.is_upcycling and not family_of(m).routed:
            raise DCDiTError(f"train.init_from upcycles a DiT into a DC-DiT, but model.arch={m.arch!r}; "
                             "choose a DC-DiT model (e.g. model.preset: DC-DiT-XL)")
        every = self.evaluation.every
        if every and every % self.checkpoint.every:
            raise DCDiTError(f"evaluation.every={every} must be a multiple of checkpoint.every="
                             f"{self.checkpoint.every} (an evaluation scores a saved checkpoint); use "
                             f"{self.checkpoint.every * max(1, round(every / self.checkpoint.every))} or 0 (off)")
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
        if not family_of(self.model).routed and (t.chunking.multi_budget or t.chunking.curriculum_start is not None):
            out.append("train.chunking applies to DC-DiT only; this DiT baseline ignores it")
        if not self.data.is_synthetic and self.data.sets_synthetic_options():
            out.append("data.image_size/num_classes/num_samples apply to the synthetic source only")
        if not self.resources.use_gpu and self.resources.gpus_per_worker != 1.0:
            out.append("resources.gpus_per_worker has no effect without resources.use_gpu")
        out += self._split_warnings()
        return out

    def _split_warnings(self) -> list[str]:
        """An elastic run trains the same weights with any worker count only if every micro-batch holds whole
        ratio-loss groups (the loss of a group needs all of its samples in one forward pass)."""
        r, t, group = self.resources, self.train, self.train.chunking.ratio_group_size
        if r.min_workers == r.max_workers or not (family_of(self.model).routed and self.model.learned_router):
            return []
        odd = [w for w in r.worker_counts if (t.global_batch // (w * t.grad_accum)) % group]
        if not odd:
            return []
        return [f"train.chunking.ratio_group_size={group} does not divide the micro-batch with {odd[0]} worker(s) "
                f"({t.global_batch // (odd[0] * t.grad_accum)} samples), so the ratio loss and the result depend on "
                "the worker count; choose a group size that divides the micro-batch at every count"]


# Keys that may change between a run and its resumption: how long, how it is checkpointed, logged, placed,
# stored and tracked, and how the global batch is split into micro-steps (the loop seeds every micro-batch by
# its position in the global batch, so workers x grad_accum only changes float summation order). Everything
# else (model, diffusion, data, optimiser, losses, precision, upcycling, seed) is "the science": a resume with
# a different value would silently train something else, so it is refused.
RESUME_FREE_KEYS = ("name", "train.steps", "train.grad_accum", "checkpoint", "logging", "resources", "storage",
                    "tracking", "data.prefetch", "evaluation")

_SECTIONS: dict[str, type] = {
    "train": TrainSection, "diffusion": DiffusionSection, "data": DataSection, "checkpoint": CheckpointSection,
    "logging": LoggingSection, "resources": ResourcesSection, "storage": StorageSection,
    "tracking": TrackingSection, "evaluation": EvaluationSection,
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
    if train.init_from is not None and family_of(model).routed and model.cond_adaptor != train.cond_adaptor:
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


def config_paths() -> dict[str, bool]:
    """Every dotted path of the experiment config tree -> whether keys below it are free (a dict field)."""
    out: dict[str, bool] = {"model.preset": False}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name == "model_preset":
                continue
            path = f"{prefix}{f.name}"
            hint = hints[f.name]
            out[path] = typing.get_origin(hint) is dict
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{path}.")

    walk(ExperimentConfig, "")
    out["model"] = False
    walk(ModelConfig, "model.")
    return out


def check_config_key(key: str, where: str) -> str:
    """`key` if it names a place in the experiment config, else a DCDiTError naming the closest path."""
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise DCDiTError(f"{where} key {key!r} must be a dotted config path such as train.lr")
    paths = config_paths()
    if key in paths:
        return key
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        if paths.get(".".join(parts[:depth])):  # below a free mapping such as tracking.tags
            return key
    leaves = [p for p in paths if p != "model"]
    hint = did_you_mean(key, leaves)
    if not hint:  # a misspelled last part under a known section: suggest among that section's keys
        parent = ".".join(parts[:-1])
        siblings = [p for p in leaves if p.rsplit(".", 1)[0] == parent]
        hint = did_you_mean(key, siblings)
    raise DCDiTError(f"{where} key '{key}' is not a config key{hint}; see `dcdit train --help` and the experiment "
                     "YAML files for the config tree (e.g. model.downsample_factor, train.chunking.ratio_loss_weight)")


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


def science_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two `science_dict()`s (for the refusal message)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


__all__ = ["ExperimentConfig", "RESUME_FREE_KEYS", "build_config", "build_model_config", "check_run_name",
           "load_experiment", "default_run_name", "science_diff", "config_paths", "check_config_key"]
