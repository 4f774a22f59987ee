"""Sweeps on Ray Tune: a sweep YAML (base experiment, grid over dotted config keys, DiT baselines, scheduler,
resources, evaluation) becomes named trials; each trial is one Ray Train run (`dcdit_platform.train`) tracked as a
child of the sweep's MLflow parent run, and resumable after the driver dies.

The sweep's own records in storage (`{storage}/{sweep}/sweep.json`, `_trials/{trial}.json`) are the source of
truth on `--resume`: Tune's experiment state is never restored (a killed driver can leave `tuner.pkl` truncated,
ray#58179, and a restored Tuner would keep the old cluster's concurrency). Finished trials are skipped; the others
re-run their trial function, whose Train run (stable name = trial name, stored under the sweep) resumes from its
own checkpoints in its own MLflow run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcdit.errors import DCDiTError, did_you_mean
from dcdit_platform.config import check_config_key, defining_file, set_dotted
from dcdit_platform.raycluster import ray_session, target_address

SWEEP_RECORD = "sweep.json"  # {storage}/{sweep}/sweep.json: the sweep as started (trials, hashes, parent run)
TRIALS_DIR = "_trials"  # {storage}/{sweep}/_trials/{trial}.json: written once a trial ends
TUNE_DIR = "_tune"  # {storage}/{sweep}/_tune-{attempt}: Tune's own logs (never read back)

# Trial statuses. FINISHED and STOPPED (early-stopped by the scheduler) are final; FAILED trials run again on
# --resume; INTERRUPTED (started, driver gone) and PENDING (never started) are what --resume finishes.
FINISHED, STOPPED, FAILED, INTERRUPTED, PENDING = "FINISHED", "STOPPED", "FAILED", "INTERRUPTED", "PENDING"
FINAL = (FINISHED, STOPPED)

# How grid keys appear in trial names unless `labels:` says otherwise (the paper's symbols).
DEFAULT_LABELS = {"model.downsample_factor": "N", "train.chunking.ratio_loss_weight": "lam"}
# Model fields that exist for DC-DiT only: a DiT baseline drops them (and grid keys on them skip baselines).
DCDIT_MODEL_FIELDS = ("downsample_factor", "router", "encoder_blocks", "decoder_blocks", "scaffold_width",
                      "dechunk_sigma", "cond_adaptor")
# Train keys that apply to DC-DiT only (router losses, upcycling a DiT into a DC-DiT).
DCDIT_TRAIN_KEYS = ("chunking", "init_from", "freeze_embedders", "cond_adaptor", "distill_steps", "distill_weight")
# A baseline keeps the data geometry of the base model.
GEOMETRY_FIELDS = ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob")
DERIVATIONS = ("param_matched", "flop_matched")
# EvalConfig fields a sweep's protocol may not set: the sweep decides them per trial.
EVAL_FIXED = ("checkpoint", "storage", "tracking_uri", "track", "address", "export_npz")


# =====================================================================================================================
# Schema
# =====================================================================================================================

@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    """Early stopping: none, or ASHA on a reported metric with `time_attr="step"` (monotonic across resumes;
    Tune's training_iteration restarts after one). Train reports at checkpoint steps, so ASHA decides there."""

    type: typing.Literal["none", "asha"] = "none"
    metric: str = "train/loss"
    mode: typing.Literal["min", "max"] = "min"
    grace_period: int | None = None  # steps before a trial can be stopped; None = the first checkpoint step
    reduction_factor: float = 3.0
    max_t: int | None = None  # trials reaching it are stopped; None = past the longest trial's train.steps

    def validate(self) -> None:
        _need(bool(self.metric), "scheduler.metric", self.metric, "must name a reported metric, e.g. train/loss")
        _need(not self.metric.startswith("eval/"), "scheduler.metric", self.metric,
              "is computed after a trial ends; ASHA needs a metric reported during training (e.g. train/loss)")
        _need(self.grace_period is None or self.grace_period >= 1, "scheduler.grace_period", self.grace_period,
              "must be >= 1")
        _need(self.reduction_factor > 1, "scheduler.reduction_factor", self.reduction_factor, "must be > 1")
        _need(self.max_t is None or self.max_t >= 1, "scheduler.max_t", self.max_t, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class BaselineSpec:
    """A DiT baseline: a preset name, a named model (preset or fields) with overrides, or derived per N."""

    name: str | None = None  # trial name; default from the preset ("DiT-B/2" -> "DiT-B_2")
    model: str | dict | None = None  # a preset name or ModelConfig fields (on top of the base model made a DiT)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys for this baseline only
    derive: tuple[str, ...] = ()  # param_matched | flop_matched: one DiT per N of the grid

    def validate(self) -> None:
        if self.derive:
            _need(self.model is None and self.name is None and not self.overrides, "baselines[].derive",
                  list(self.derive), "stands alone: write other baselines as separate entries")
            for how in self.derive:
                _need(how in DERIVATIONS, "baselines[].derive", how,
                      f"must be one of {', '.join(DERIVATIONS)}{did_you_mean(how, DERIVATIONS)}")
        else:
            _need(self.model is not None, "baselines[]", self.name,
                  "needs `model:` (a preset such as DiT-B/2 or model fields) or `derive:`")


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A sweep file, checked. `experiment` is relative to the file that sets it (sweeps may inherit: `_base_`)."""

    experiment: str  # the base experiment YAML
    name: str | None = None  # default: the sweep file's stem; --name overrides
    label: str | None = None  # the base model in trial names; default its preset ("DC-DiT-B") or its arch
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys applied to every trial
    grid: dict[str, list] = field(default_factory=dict)  # dotted key -> values; trials = the product
    labels: dict[str, str] = field(default_factory=dict)  # grid key -> its short name in trial names
    baselines: list[BaselineSpec] = field(default_factory=list)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: dict[str, Any] = field(default_factory=dict)  # resources.* of every trial, plus trial_cpus
    max_concurrent_trials: int | None = None  # None = as many as the cluster fits; larger values are capped
    autoscaling: bool = False  # the cluster adds nodes on demand: do not cap by the nodes present at the start
    max_failures: int = 2  # Tune restarts of a failed trial (each resumes its Train run from its checkpoint)
    evaluation: dict[str, Any] | None = None  # an EvalConfig protocol run on every finished trial

    def validate(self) -> None:
        _need(bool(self.experiment), "experiment", self.experiment, "must name the base experiment YAML")
        if self.name is not None:
            _check_name(self.name, "name")
        _need(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1, "max_concurrent_trials",
              self.max_concurrent_trials, "must be >= 1 or null (derived from the cluster)")
        _need(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= -1 (-1 = no limit)")
        for key, values in self.grid.items():
            _need(isinstance(values, list) and len(values) >= 1, f"grid.{key}", values, "must be a non-empty list")
            _need(len({json.dumps(v, sort_keys=True) for v in values}) == len(values), f"grid.{key}", values,
                  "lists a value twice")
        for key, label in self.labels.items():
            _need(key in self.grid, f"labels.{key}", label,
                  f"labels a key that is not in grid{did_you_mean(key, self.grid)}")
            _need(isinstance(label, str) and re.fullmatch(r"[A-Za-z0-9.-]*", label) is not None, f"labels.{key}",
                  label, "must be a short name of letters, digits, '.' and '-' (e.g. lr)")
        trial_cpus = self.resources.get("trial_cpus", TRIAL_CPUS)
        _need(isinstance(trial_cpus, (int, float)) and not isinstance(trial_cpus, bool) and 0 < trial_cpus <= 64,
              "resources.trial_cpus", trial_cpus, "must be a number in (0, 64]")


TRIAL_CPUS = 0.01  # the Tune trial's own actor only waits on its Train run; its workers reserve their own CPUs
_TOP_KEYS = tuple(f.name for f in dataclasses.fields(SweepSpec))


def parse_sweep(data: dict[str, Any], where: str = "sweep") -> SweepSpec:
    """A `SweepSpec` from the YAML mapping (after `_base_`), rejecting unknown keys with a suggestion."""
    from dcdit.config import from_dict

    if not isinstance(data, dict):
        raise DCDiTError(f"{where} must be a mapping of sweep keys, got {type(data).__name__}")
    data = dict(data)
    for key in data:
        if key not in _TOP_KEYS:
            raise DCDiTError(f"{where}: unknown sweep key '{key}'{did_you_mean(str(key), _TOP_KEYS)}; "
                             f"known: {', '.join(_TOP_KEYS)}")
    if "experiment" not in data:
        raise DCDiTError(f"{where}: missing required sweep key 'experiment' (the base experiment YAML)")
    scheduler = data.pop("scheduler", None)
    if scheduler is None or scheduler == "none":
        scheduler = {}
    elif isinstance(scheduler, str):
        scheduler = {"type": scheduler}
    baselines = data.pop("baselines", None) or []
    if not isinstance(baselines, list):
        raise DCDiTError(f"baselines={baselines!r} must be a list (preset names, mappings, or derive: [...])")
    for key in ("overrides", "grid", "labels", "resources"):
        if data.get(key) is None:
            data.pop(key, None)
        elif not isinstance(data[key], dict):
            raise DCDiTError(f"{key} must be a mapping, got {type(data[key]).__name__}")
    if "evaluation" in data and data["evaluation"] is not None and not isinstance(data["evaluation"], dict):
        raise DCDiTError(f"evaluation must be a mapping of evaluation settings or null, got {data['evaluation']!r}")
    sched = from_dict(SchedulerSpec, scheduler, prefix="scheduler")
    parsed_baselines = [_parse_baseline(b, i) for i, b in enumerate(baselines)]
    scalars = {k: v for k, v in data.items() if k not in ("grid", "overrides", "labels", "resources", "evaluation")}
    _check_scalar_types(scalars)
    spec = SweepSpec(scheduler=sched, baselines=parsed_baselines, grid=dict(data.get("grid", {})),
                     overrides=dict(data.get("overrides", {})), labels=dict(data.get("labels", {})),
                     resources=dict(data.get("resources", {})), evaluation=data.get("evaluation"), **scalars)
    spec.validate()
    return spec


def _check_scalar_types(values: dict[str, Any]) -> None:
    kinds = {"experiment": str, "name": str, "label": str, "max_concurrent_trials": int, "max_failures": int,
             "autoscaling": bool}
    for key, value in values.items():
        want = kinds[key]
        if value is None and key not in ("experiment",):
            continue
        if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
            kind = {str: "a string", int: "an integer", bool: "true or false"}[want]
            raise DCDiTError(f"{key}={value!r} must be {kind}")


def _parse_baseline(item: Any, index: int) -> BaselineSpec:
    where = f"baselines[{index}]"
    if isinstance(item, str):
        return BaselineSpec(model=item)
    if not isinstance(item, dict):
        raise DCDiTError(f"{where}={item!r} must be a preset name (DiT-B/2), a mapping, or derive: [...]")
    known = ("name", "model", "overrides", "derive")
    for key in item:
        if key not in known:
            raise DCDiTError(f"{where}: unknown key '{key}'{did_you_mean(str(key), known)}; known: {', '.join(known)}")
    derive = item.get("derive") or ()
    if isinstance(derive, str):
        derive = (derive,)
    overrides = item.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise DCDiTError(f"{where}.overrides must be a mapping of dotted keys to values")
    name = item.get("name")
    if name is not None:
        _check_name(name, f"{where}.name")
    model = item.get("model")
    if model is not None and not isinstance(model, (str, dict)):
        raise DCDiTError(f"{where}.model={model!r} must be a preset name or a mapping of model fields")
    spec = BaselineSpec(name=name, model=model, overrides=dict(overrides), derive=tuple(derive))
    spec.validate()
    return spec


# =====================================================================================================================
# Trials
# =====================================================================================================================

@dataclass
class TrialSpec:
    """One trial: its readable name, what it changes relative to the base experiment, and its full config tree."""

    name: str
    kind: str  # a grid point ("dcdit", or "dit" when the base experiment is a DiT) or "baseline"
    overrides: dict[str, Any]  # dotted key -> value, relative to the base experiment + sweep overrides
    tree: dict[str, Any]  # the experiment config as a plain dict (before storage/tracking flags)
    config: Any = None  # the validated ExperimentConfig (with the sweep's storage/tracking)
    config_hash: str = ""
    note: str | None = None  # how a derived baseline was matched


def format_value(value: Any) -> str:
    """A grid value as it appears in a trial name: 4.0 -> 4, 0.03 -> 0.03, 'cosine' -> cosine."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(format_value(v) for v in value)
    elif isinstance(value, dict):
        text = value.get("preset") or "-".join(f"{k}{format_value(v)}" for k, v in value.items())
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text.replace("/", "_")).strip("-") or "x"


def name_part(key: str, value: Any, labels: dict[str, str]) -> str:
    label = labels.get(key) or DEFAULT_LABELS.get(key)
    if label is not None:
        return f"{label}{format_value(value)}"
    return f"{key.rsplit('.', 1)[-1]}-{format_value(value)}"


def model_label(tree: dict[str, Any], model_config) -> str:
    model = tree.get("model")
    preset = model if isinstance(model, str) else (model or {}).get("preset")
    if preset:
        return preset.replace("/", "_")
    return "DC-DiT" if model_config.arch == "dcdit" else f"DiT_{model_config.patch_size}"


def _is_dcdit_only(key: str) -> bool:
    parts = key.split(".")
    if parts[0] == "model" and len(parts) > 1:
        return parts[1] in DCDIT_MODEL_FIELDS
    return parts[0] == "train" and len(parts) > 1 and parts[1] in DCDIT_TRAIN_KEYS


def _is_model_choice(key: str, value: Any) -> bool:
    return key in ("model", "model.preset") and (isinstance(value, str) or isinstance(value, dict))


def dit_fields(model_config) -> dict[str, Any]:
    """The base model's fields as a DiT (DC-DiT-only fields dropped)."""
    fields = {k: v for k, v in dataclasses.asdict(model_config).items() if k not in DCDIT_MODEL_FIELDS}
    fields["arch"] = "dit"
    return fields


def derive_baseline(model_config, n: float, how: str) -> dict[str, Any]:
    """Model fields of the DiT matched to the DC-DiT `model_config` at compression N (dcdit.baselines, rule
    "deepen"): patch sqrt(N) (N = 4 keeps as many backbone tokens as patch 2), same width, as many blocks as make
    its parameters (param_matched) or analytic forward MACs at 1/N kept tokens (flop_matched) closest."""
    from dcdit.baselines import default_patch_size, flop_matched_dit, param_matched_dit

    reference = model_config.replace(downsample_factor=float(n))
    patch = default_patch_size(reference)
    if model_config.input_size % patch:
        raise DCDiTError(f"baselines derive: patch {patch} (the token count of N={n:g}) does not divide "
                         f"model.input_size={model_config.input_size}; derive needs N = p*p with p dividing it")
    matched = (param_matched_dit if how == "param_matched" else flop_matched_dit)(reference, patch_size=patch)
    return {**dit_fields(model_config), "patch_size": matched.patch_size, "depth": matched.depth,
            "hidden_size": matched.hidden_size, "num_heads": matched.num_heads}


def expand_trials(spec: SweepSpec, common: dict[str, Any]) -> list[TrialSpec]:
    """The grid's DC-DiT trials in grid order, then the baselines; names are unique and readable."""
    from dcdit_platform.config import build_model_config

    keys = list(spec.grid)
    first = copy.deepcopy(common)
    for key in keys:  # a grid over whole models: the first one stands for the base
        if key in ("model", "model.preset"):
            set_dotted(first, key, spec.grid[key][0])
    if "model" not in first:
        raise DCDiTError("the base experiment has no `model:`; set it there, in the sweep's overrides "
                         "(model.preset: DC-DiT-B) or in the grid (model: [DC-DiT-S, DC-DiT-B])")
    base_model, _ = build_model_config(first["model"])
    label = spec.label or model_label(first, base_model)
    trials: list[TrialSpec] = []
    for values in itertools.product(*(spec.grid[k] for k in keys)) if keys else [()]:
        tree = copy.deepcopy(common)
        parts, head = [], label
        for key, value in zip(keys, values):
            set_dotted(tree, key, value)
            if _is_model_choice(key, value) and key not in spec.labels:
                head = format_value(value)
            else:
                parts.append(name_part(key, value, spec.labels))
        trials.append(TrialSpec(name="_".join([head, *parts]), kind=base_model.arch, overrides=dict(zip(keys, values)),
                                tree=tree))

    shared = [k for k in keys if not _is_dcdit_only(k) and k not in ("model", "model.preset")]
    shared_values = list(itertools.product(*(spec.grid[k] for k in shared))) if shared else [()]
    geometry = {k: getattr(base_model, k) for k in GEOMETRY_FIELDS}
    family = label.replace("DC-DiT", "DiT", 1) if label.startswith("DC-DiT") else "DiT"
    baselines: list[tuple] = []  # (name, model tree, overrides, summary of what changed, derivation note)
    for b in spec.baselines:
        if b.derive:
            if base_model.arch != "dcdit":
                raise DCDiTError("baselines derive: needs a DC-DiT base experiment (the DiT is matched to it)")
            ns = spec.grid.get("model.downsample_factor") or [base_model.downsample_factor]
            derived = []
            for n in ns:
                for how in b.derive:
                    fields = derive_baseline(base_model, float(n), how)
                    summary = {"model.arch": "dit", "model.patch_size": fields["patch_size"],
                               "model.depth": fields["depth"]}
                    derived.append([f"{family}_{fields['patch_size']}_{how.replace('_', '-')}", fields, {}, summary,
                                    f"{how} to DC-DiT N={format_value(n)}", n])
            names = [d[0] for d in derived]
            for d in derived:  # two N with the same patch (N=4 and N=5 -> patch 2): say which N
                if names.count(d[0]) > 1:
                    d[0] += f"_N{format_value(d[5])}"
            baselines += [tuple(d[:5]) for d in derived]
        elif isinstance(b.model, str):
            name = b.name or b.model.replace("/", "_")
            baselines.append((name, {"preset": b.model, **geometry}, b.overrides, {"model.preset": b.model,
                                                                                   **b.overrides}, None))
        else:
            model = dict(b.model)
            if "preset" in model:
                tree_model = {**geometry, **model}
            else:
                tree_model = {**dit_fields(base_model), **model}
            name = b.name or f"{family}_{tree_model.get('patch_size', base_model.patch_size)}"
            baselines.append((name, tree_model, b.overrides, {**{f"model.{k}": v for k, v in model.items()},
                                                              **b.overrides}, None))
    for name, model_tree, overrides, summary, note in baselines:
        for values in shared_values:
            tree = copy.deepcopy(common)
            tree["model"] = copy.deepcopy(model_tree)
            train = tree.setdefault("train", {})
            for key in DCDIT_TRAIN_KEYS:  # router losses and upcycling do not apply to a DiT
                train.pop(key, None)
            for key, value in overrides.items():
                set_dotted(tree, check_config_key(key, f"baseline {name} override"), value)
            parts = []
            for key, value in zip(shared, values):
                set_dotted(tree, key, value)
                parts.append(name_part(key, value, spec.labels))
            trials.append(TrialSpec(name="_".join([name, *parts]), kind="baseline",
                                    overrides={**summary, **dict(zip(shared, values))}, tree=tree, note=note))

    seen: dict[str, TrialSpec] = {}
    for trial in trials:
        _check_name(trial.name, f"trial name {trial.name!r}")
        if trial.name in seen:
            raise DCDiTError(f"two trials would both be named {trial.name}: give baselines a `name:` or grid keys a "
                             "`labels:` entry that tells them apart")
        seen[trial.name] = trial
    return trials


# =====================================================================================================================
# The plan: everything checked before Ray starts
# =====================================================================================================================

@dataclass
class SweepPlan:
    spec: SweepSpec
    name: str
    path: str  # the sweep file
    storage: Any  # Storage at the storage root
    tracking_uri: str  # with credentials, never printed
    trials: list[TrialSpec]
    experiment: str  # MLflow experiment (of the base config)
    footprint: TrialFootprint
    source: dict[str, Any] = field(default_factory=dict)  # the sweep YAML tree (for the parent run)
    warnings: list[str] = field(default_factory=list)

    @property
    def sweep_storage(self):
        """{storage}/{sweep}: the sweep's records, its trials' Train runs and Tune's logs."""
        return self.storage.child(self.name)

    @property
    def display_tracking_uri(self) -> str:
        from dcdit_platform.secrets import redact

        return redact(self.tracking_uri)

    def trial(self, name: str) -> TrialSpec:
        return next(t for t in self.trials if t.name == name)


@dataclass(frozen=True)
class TrialFootprint:
    """What one running trial reserves: its Tune actor, then `num_workers` Train worker bundles."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0 without use_gpu
    trial_cpus: float

    def bundles(self) -> list[dict[str, float]]:
        worker = {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}
        return [dict(worker) for _ in range(self.num_workers)] + [{"CPU": self.trial_cpus}]


def load_sweep(path: str | os.PathLike, *, name: str | None = None, overrides: Sequence[str] = (),
               storage: str | None = None, tracking_uri: str | None = None) -> SweepPlan:
    """Read, expand and validate a sweep: every trial's config is built and checked here (no Ray)."""
    from dcdit.config import from_dict
    from dcdit_platform.config import StorageSection, TrackingSection, apply_overrides, build_config, load_yaml_tree
    from dcdit_platform.storage import open_storage
    from dcdit_platform.tracking import default_tracking_uri

    path = str(path)
    source = load_yaml_tree(path)
    spec = parse_sweep(source, path)
    origin = defining_file(Path(path).resolve(), "experiment") or Path(path).resolve()
    experiment_path = origin.parent / spec.experiment
    if not experiment_path.is_file():
        raise DCDiTError(f"experiment: {spec.experiment} not found next to {origin} ({experiment_path})")
    for key in spec.overrides:
        check_config_key(key, "overrides")
    for key in spec.grid:
        check_config_key(key, "grid")
    common = load_yaml_tree(experiment_path)
    for key, value in spec.overrides.items():
        set_dotted(common, key, value)
    common = apply_overrides(common, list(overrides))
    resources = dict(spec.resources)
    trial_cpus = float(resources.pop("trial_cpus", TRIAL_CPUS))
    for key, value in resources.items():
        set_dotted(common, f"resources.{check_config_key(f'resources.{key}', 'resources').split('.', 1)[1]}", value)
    if storage is not None:
        set_dotted(common, "storage.uri", storage)
    if tracking_uri is not None:
        set_dotted(common, "tracking.uri", tracking_uri)
    common.pop("name", None)

    sweep_name = _check_name(name or spec.name or _stem(path), "--name" if name else "name")
    storage_section = from_dict(StorageSection, common.get("storage") or {}, prefix="storage")
    tracking_section = from_dict(TrackingSection, common.get("tracking") or {}, prefix="tracking")
    root = open_storage(storage_section.uri, storage_section.options() or None)
    if tracking_section.uri is None and root.is_local:
        resolved_tracking = default_tracking_uri(root.uri)
    elif tracking_section.uri is None:
        raise DCDiTError(f"storage {storage_section.uri} is on S3, so the sweep needs an MLflow tracking server: pass "
                         "--tracking-uri http://HOST:PORT (or set tracking.uri)")
    else:
        resolved_tracking = tracking_section.uri
    trials = expand_trials(spec, common)
    sweep_uri = root.join(sweep_name)
    warnings: list[str] = []
    for trial in trials:
        tree = copy.deepcopy(trial.tree)
        tree["name"] = trial.name
        set_dotted(tree, "storage.uri", sweep_uri)
        set_dotted(tree, "tracking.uri", resolved_tracking)
        tracking = tree["tracking"]
        tracking["tags"] = {**(tracking.get("tags") or {}), "dcdit.sweep": sweep_name, "dcdit.trial": trial.name,
                            "dcdit.trial_kind": trial.kind, **({"dcdit.baseline": trial.note} if trial.note else {})}
        try:
            trial.config = build_config(tree)
        except DCDiTError as err:
            raise DCDiTError(f"trial {trial.name} ({_describe(trial.overrides)}): {err}") from None
        trial.tree = tree
        trial.config_hash = trial.config.config_hash()
        warnings += [f"trial {trial.name}: {w}" for w in trial.config.warnings()]
    seen: dict[str, str] = {}
    for trial in trials:
        if trial.config_hash in seen:
            raise DCDiTError(f"trials {seen[trial.config_hash]} and {trial.name} train the same config; remove one "
                             "(a named baseline equal to a derived one, or a grid value repeated through overrides)")
        seen[trial.config_hash] = trial.name
    base = trials[0].config
    res = base.resources
    footprint = TrialFootprint(num_workers=res.num_workers, cpus_per_worker=res.cpus_per_worker,
                               gpus_per_worker=res.gpus_per_worker if res.use_gpu else 0.0, trial_cpus=trial_cpus)
    if spec.scheduler.type == "asha":
        every = {t.config.checkpoint.every for t in trials}
        grace = spec.scheduler.grace_period
        if grace is not None and any(grace % e for e in every):
            warnings.append(f"scheduler.grace_period={grace} is not a multiple of checkpoint.every "
                            f"({', '.join(map(str, sorted(every)))}): ASHA sees metrics at checkpoint steps only")
    if spec.evaluation is not None:
        eval_protocol(spec.evaluation, res)  # validate now
    plan = SweepPlan(spec=spec, name=sweep_name, path=path, storage=root, tracking_uri=resolved_tracking,
                     trials=trials, experiment=base.tracking.experiment, footprint=footprint, source=source,
                     warnings=warnings)
    # Every trial runs with one footprint: resources.* may only come from the base and the sweep's `resources:`.
    for trial in trials:
        r = trial.config.resources
        if (r.num_workers, r.cpus_per_worker, r.use_gpu) != (res.num_workers, res.cpus_per_worker, res.use_gpu):
            raise DCDiTError(f"trial {trial.name} changes resources.*; set per-trial resources in the sweep's "
                             "`resources:` section (one footprint for all trials)")
    return plan


def eval_protocol(protocol: dict[str, Any], resources) -> dict[str, Any]:
    """The sweep's evaluation settings as EvalConfig keyword arguments (validated); workers default to the trial's."""
    from dcdit.config import from_dict
    from dcdit_platform.evaluate import EvalConfig

    for key in protocol:
        if key in EVAL_FIXED:
            raise DCDiTError(f"evaluation.{key} is set by the sweep for every trial; remove it")
    kwargs = {"workers": resources.num_workers, "cpus_per_worker": resources.cpus_per_worker, **protocol}
    from_dict(EvalConfig, {"checkpoint": "<trial checkpoint>", **kwargs}, prefix="evaluation")
    return kwargs


def _stem(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem).strip("-._") or "sweep"


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the base experiment"


# =====================================================================================================================
# How many trials at once
# =====================================================================================================================

def trials_that_fit(nodes: Sequence[dict[str, float]], footprint: TrialFootprint, limit: int) -> int:
    """How many trials fit on `nodes` (total resources per node) at once, each with all its bundles placed
    (first fit, largest bundles first). More would starve: Tune would start trial actors whose Train workers can
    never be placed, and their worker groups time out."""
    free = [{k: float(v) for k, v in node.items()} for node in nodes]
    bundles = sorted(footprint.bundles(), key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0)))
    placed = 0
    while placed < limit:
        trial = copy.deepcopy(free)
        for bundle in bundles:
            node = next((n for n in trial if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
            if node is None:
                return placed
            for k, v in bundle.items():
                node[k] = node.get(k, 0.0) - v
        free = trial
        placed += 1
    return placed


def resolve_max_concurrent(requested: int | None, nodes: Sequence[dict[str, float]], footprint: TrialFootprint,
                           pending: int, *, local: bool, autoscaling: bool = False) -> tuple[int, str | None]:
    """(max_concurrent_trials, warning or None): what fits now, capped by the requested value and the trial count.
    On an autoscaling cluster the requested value stands (pending trials are what makes it add nodes)."""
    fit = trials_that_fit(nodes, footprint, max(pending, 1))
    want = requested if requested is not None else max(pending, 1)
    if autoscaling and not local:
        return min(want, max(pending, 1)), None
    if fit == 0:
        need = ", ".join(f"{k} {v:g}" for k, v in _sum_bundles(footprint).items())
        biggest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        if local:
            raise DCDiTError(f"one trial needs {need} ({footprint.num_workers} worker(s) x "
                             f"{footprint.cpus_per_worker:g} CPU + {footprint.trial_cpus:g} for the trial) but this "
                             f"machine has {biggest:g} CPUs; lower the sweep's resources or pass --address")
        return 1, (f"no trial fits on the cluster's current nodes (one needs {need}); running one at a time while "
                   "the autoscaler adds nodes")
    if want > fit:
        if requested is None:
            return fit, None
        return fit, (f"max_concurrent_trials={want} capped to {fit}: only {fit} trial(s) fit on the cluster at once "
                     "and more would leave Train worker groups waiting for resources")
    return want, None


def _sum_bundles(footprint: TrialFootprint) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in footprint.bundles():
        for k, v in bundle.items():
            total[k] = total.get(k, 0.0) + v
    return total


# =====================================================================================================================
# Records in storage
# =====================================================================================================================

class SweepState:
    """The sweep's records under {storage}/{sweep}: sweep.json and one JSON per ended trial (atomic writes)."""

    def __init__(self, storage):
        self.storage = storage

    def sweep(self) -> dict | None:
        try:
            return self.storage.read_json(SWEEP_RECORD)
        except FileNotFoundError:
            return None

    def write_sweep(self, record: dict) -> None:
        self.storage.write_json(SWEEP_RECORD, record)

    def trial(self, name: str) -> dict | None:
        try:
            return self.storage.read_json(f"{TRIALS_DIR}/{name}.json")
        except FileNotFoundError:
            return None

    def write_trial(self, name: str, record: dict) -> None:
        self.storage.write_json(f"{TRIALS_DIR}/{name}.json", record)


def _check_compatible(plan: SweepPlan, record: dict) -> list[str]:
    """Refuse a resume whose trials train something else; return the names of trials added since."""
    old = {t["name"]: t for t in record.get("trials", [])}
    new = {t.name: t for t in plan.trials}
    changed = [n for n in old if n in new and old[n]["config_hash"] != new[n].config_hash]
    removed = [n for n in old if n not in new]
    if changed or removed:
        what = "; ".join(filter(None, [f"changed: {', '.join(changed)}" if changed else "",
                                       f"removed: {', '.join(removed)}" if removed else ""]))
        raise DCDiTError(f"sweep {plan.name} was started with other trials ({what}); resuming would mix two "
                         "sweeps. Revert the sweep file, or start a new sweep with --name (train.steps, "
                         "checkpoint.*, logging.*, resources.* and max_concurrent_trials may change)")
    return [n for n in new if n not in old]


# =====================================================================================================================
# The trial (runs in a Tune actor)
# =====================================================================================================================

def trial_main(config: dict, ctx: dict | None = None) -> None:
    """Tune's function trainable: train (or resume) this trial's Ray Train run, evaluate it, record the result.

    A trial that already has a final record only replays its metric history to the scheduler (see `run_sweep`)."""
    from ray import tune

    from dcdit_platform.config import build_config
    from dcdit_platform.storage import open_storage
    from dcdit_platform.tracking import Tracker
    from dcdit_platform.train import plan_run, run_training

    started = time.perf_counter()
    ctx = ctx or {}
    name = config["trial"]
    for key, value in ctx.get("env", {}).items():
        os.environ.setdefault(key, value)
    state = SweepState(open_storage(ctx["sweep_uri"], ctx.get("storage_options") or None))
    record = state.trial(name)
    if record is not None and record.get("status") in FINAL:
        metric = ctx.get("scheduler_metric")
        for step, value in record.get("history", []):
            tune.report({"step": step, metric: value, "replayed": True})
        return

    tree = copy.deepcopy(ctx["trials"][name])
    set_dotted(tree, "tracking.uri", ctx["tracking_uri"])
    set_dotted(tree, "tracking.parent_run_id", ctx["parent_run_id"])
    plan = plan_run(build_config(tree), name=name)
    from ray.tune.integration.ray_train import TuneReportCallback

    from dcdit_platform.runs import latest_checkpoint_state

    latest = latest_checkpoint_state(plan.storage.child(name))
    resumed_from = latest[0] if latest else None

    summary = run_training(plan, callbacks=[TuneReportCallback()], echo=lambda text: print(text, file=sys.stderr))
    metrics = dict(summary.get("metrics") or {})
    evaluation = None
    if ctx.get("evaluation") is not None and summary.get("checkpoint"):
        evaluation = evaluate_trial(ctx["evaluation"], summary["checkpoint"], ctx["tracking_uri"], ctx["sweep_uri"],
                                    ctx.get("env"))
        metrics.update({f"eval/{k}": v for k, v in evaluation.items() if k in EVAL_METRICS and _is_number(v)})
    history: list = []
    if ctx.get("scheduler_metric"):
        tracker = Tracker(ctx["tracking_uri"])
        history = [[m.step, m.value] for m in sorted(tracker.metric_history(summary["mlflow_run_id"],
                                                                            ctx["scheduler_metric"]),
                                                     key=lambda m: m.step)]
    state.write_trial(name, {"name": name, "status": FINISHED, "step": summary.get("step"),
                             "checkpoint": summary.get("checkpoint"), "mlflow_run_id": summary["mlflow_run_id"],
                             "metrics": metrics, "evaluation": evaluation, "history": history,
                             "resumed_from": resumed_from, "wall_s": round(time.perf_counter() - started, 3),
                             "ended_unix": time.time()})


def evaluate_trial(protocol: dict, checkpoint: str, tracking_uri: str, storage_uri: str,
                   env: dict[str, str] | None = None) -> dict:
    """The sweep's evaluation protocol on a finished trial's checkpoint (dcdit_platform.evaluate); its metrics go to
    the trial's MLflow run and come back for the sweep summary. The trial's Train workers have ended by now, so
    the evaluator's actors use the resources they held.

    Runs as a task outside the trial's placement group: Tune captures a trial's child tasks and actors into it,
    and its one small bundle (the trial actor's CPU) cannot hold the evaluator's actors."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(num_cpus=0)(_evaluate).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    # Credentials go through the object store (a reference in the task spec), as train.py passes its secrets.
    return ray.get(task.remote(protocol, checkpoint, ray.put(tracking_uri), storage_uri, ray.put(env or {})))


def _evaluate(protocol: dict, checkpoint: str, tracking_uri: str, storage_uri: str, env: dict[str, str]) -> dict:
    from dcdit_platform.evaluate import EvalConfig, evaluate

    for key, value in env.items():
        os.environ.setdefault(key, value)

    result = evaluate(EvalConfig(checkpoint=checkpoint, tracking_uri=tracking_uri, storage=storage_uri, track=True,
                                 **protocol), echo=lambda text: print(f"dcdit sweep eval: {text}", file=sys.stderr))
    return {k: v for k, v in result.items() if k in EVAL_KEYS}


# What a trial's summary keeps of an evaluation (dcdit_platform.evaluate's summary): the metrics, where the full
# result lies, and the per-rho results of a tail-drop sweep.
EVAL_METRICS = ("fid", "fd", "sfid", "is_mean", "is_std", "kid_mean", "kid_std", "kd_mean", "kd_std", "precision",
                "recall", "class_accuracy")
EVAL_KEYS = (*EVAL_METRICS, "num_samples", "step", "slug", "result_uri", "sweep")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def trial_name(trial) -> str:
    return trial.config["trial"]


# =====================================================================================================================
# The driver
# =====================================================================================================================

def _tune_callback_class():
    from ray import tune

    class SweepCallback(tune.Callback):
        """Driver-side bookkeeping as Tune reports trial events: records and MLflow status for trials that end
        without finishing (stopped by the scheduler, or failed after their retries)."""

        def __init__(self, driver: _Driver):
            self.driver = driver

        def on_trial_start(self, iteration, trials, trial, **info):
            name = trial_name(trial)
            if name in self.driver.replayed:
                self.driver.echo(f"trial {name} is done; replaying its metrics to the scheduler")
            else:
                self.driver.echo(f"trial {name} started")

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.driver.echo(f"trial {trial_name(trial)} failed; retrying (attempt {trial.num_failures + 1}), "
                             "resuming from its last checkpoint")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.driver.trial_ended(trial_name(trial), None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.driver.trial_ended(trial_name(trial), _error_text(trial))

    return SweepCallback


def _error_text(trial) -> str:
    from dcdit_platform.secrets import redact

    text = ""
    with contextlib.suppress(Exception):
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ours = [ln for ln in lines if "DCDiTError" in ln]
    errors = [ln for ln in lines if re.search(r"\w+(Error|Exception)\b", ln)]
    picked = (ours or errors or lines or [""])[-1]
    picked = picked.split("DCDiTError: ", 1)[-1]
    return redact(" ".join(picked.split()))[:400] or "the trial failed (see Tune's error file)"


class _Driver:
    """State shared by run_sweep and the Tune callback."""

    def __init__(self, plan: SweepPlan, tracker, state: SweepState, echo: Callable[[str], None]):
        self.plan, self.tracker, self.state, self.echo = plan, tracker, state, echo
        self.replayed: set[str] = set()  # trials done before this attempt (they only replay their history)

    def trial_run_id(self, name: str) -> str | None:
        from dcdit_platform.runs import read_run_record

        with contextlib.suppress(DCDiTError, OSError):
            record = read_run_record(self.plan.sweep_storage, name)
            if record:
                return record.get("mlflow_run_id")
        return None

    def trial_ended(self, name: str, error: str | None) -> None:
        """A Tune trial ended: finished (its record exists), stopped by the scheduler, or failed for good."""
        from dcdit_platform.runs import latest_checkpoint_state

        record = self.state.trial(name)
        if record is not None and record.get("status") in FINAL:
            if record.get("status") == FINISHED and name not in self.replayed:
                loss = record.get("metrics", {}).get("train/loss")
                self.echo(f"trial {name} finished at step {record.get('step')}"
                          + (f", train/loss {loss:.4f}" if isinstance(loss, float) else ""))
            return
        status = FAILED if error else STOPPED
        latest = latest_checkpoint_state(self.plan.sweep_storage.child(name))
        run_id = self.trial_run_id(name)
        steps = self.plan.trial(name).config.train.steps
        if status == STOPPED and latest and latest[1].get("step", 0) >= steps and self.plan.spec.evaluation is None:
            status = FINISHED  # stopped right after its last step: it trained to the end
        self.state.write_trial(name, {
            "name": name, "status": status, "step": latest[1].get("step") if latest else None,
            "checkpoint": self.plan.sweep_storage.join(name, latest[0]) if latest else None, "mlflow_run_id": run_id,
            "metrics": dict(latest[1].get("metrics", {})) if latest else {}, "error": error,
            "history": self._history(run_id) if status in FINAL else [], "ended_unix": time.time()})
        if run_id:
            with contextlib.suppress(DCDiTError):
                self.tracker.set_tags(run_id, {"dcdit.sweep.status": status, **({"dcdit.error": error} if error
                                                                                  else {})})
                self.tracker.finish(run_id, {STOPPED: "KILLED", FAILED: "FAILED"}.get(status, "FINISHED"))
        what = {STOPPED: f"stopped early by the scheduler at step {latest[1].get('step') if latest else 0}",
                FINISHED: f"finished at step {steps}"}.get(status, f"failed: {error}")
        self.echo(f"trial {name} {what}")

    def _history(self, run_id: str | None) -> list:
        metric = self.plan.spec.scheduler.metric if self.plan.spec.scheduler.type != "none" else None
        if not run_id or not metric:
            return []
        with contextlib.suppress(DCDiTError):
            return [[m.step, m.value] for m in sorted(self.tracker.metric_history(run_id, metric),
                                                       key=lambda m: m.step)]
        return []


def run_sweep(plan: SweepPlan, *, resume: bool = False, address: str | None = None,
              echo: Callable[[str], None] | None = None) -> dict:
    """Run (or, with `resume`, continue) the planned sweep on Ray Tune; returns the JSON summary."""
    from dcdit_platform.secrets import redact, redact_config
    from dcdit_platform.tracking import Tracker, flat_params
    from dcdit_platform.train import plan_run

    echo = echo or (lambda text: print(f"dcdit sweep: {text}", file=sys.stderr, flush=True))
    started = time.perf_counter()
    # MLflow's telemetry thread sets and unsets an environment variable while other threads read os.environ
    # (KeyError in tracking.redact); clusters rarely reach its endpoint anyway. Inherited by a local Ray's workers.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sweep_storage = plan.sweep_storage
    state = SweepState(sweep_storage)
    record = state.sweep()
    if record is not None and not resume:
        done = sum(1 for t in plan.trials if (state.trial(t.name) or {}).get("status") in FINAL)
        raise DCDiTError(f"sweep {plan.name} already exists at {redact(sweep_storage.uri)} ({done} of "
                         f"{len(plan.trials)} trials done): pass --resume to finish it, or --name for a new sweep")
    added = _check_compatible(plan, record) if record is not None else []
    for trial in plan.trials:  # data, storage and upcycling sources, checked before anything starts
        plan_run(trial.config, name=trial.name)
    if added:
        echo(f"{len(added)} trial(s) added since the sweep started: {', '.join(added)}")

    tracker = Tracker(plan.tracking_uri)
    parent = tracker.open_run(experiment=plan.experiment, run_name=plan.name,
                              run_id=(record or {}).get("mlflow_run_id"),
                              tags={"dcdit.sweep": plan.name, "dcdit.kind": "sweep"})
    if record is None:
        run = tracker.get_run(parent)
        if "dcdit.config_hash" in run.data.tags:
            raise DCDiTError(f"MLflow experiment {plan.experiment} already has a training run named {plan.name}; "
                             "choose another sweep name with --name")
        tracker.log_params(parent, {**{f"sweep.{k}": v for k, v in flat_params(redact_config(
            {k: v for k, v in plan.source.items() if k not in ("baselines",)})).items()},
            "sweep.trials": len(plan.trials), "sweep.baselines": json.dumps(
                [t.name for t in plan.trials if t.kind == "baseline"])})
        import yaml

        tracker.log_text(parent, yaml.safe_dump(redact_config(plan.source), sort_keys=False), "sweep/sweep.yaml")
    attempt = int((record or {}).get("attempts", 0)) + 1
    state.write_sweep({
        "name": plan.name, "mlflow_run_id": parent, "experiment": plan.experiment,
        "tracking_uri": plan.display_tracking_uri, "sweep_file": plan.path, "attempts": attempt,
        "created_unix": (record or {}).get("created_unix", time.time()),
        "source": redact_config(plan.source),
        "trials": [{"name": t.name, "kind": t.kind, "overrides": _jsonable(t.overrides), "config_hash": t.config_hash,
                    "config": redact_config(t.config.to_dict())} for t in plan.trials]})
    echo(f"sweep {plan.name}: {len(plan.trials)} trials, MLflow parent run {parent} at {plan.display_tracking_uri} "
         f"(experiment {plan.experiment}), storage {redact(sweep_storage.uri)}")

    driver = _Driver(plan, tracker, state, echo)
    final = {t.name for t in plan.trials if (state.trial(t.name) or {}).get("status") in FINAL}
    driver.replayed = final
    todo = [t.name for t in plan.trials if t.name not in final]
    if final:
        echo(f"{len(final)} trial(s) already done, not re-run: {', '.join(sorted(final))}")
    interrupted = False
    max_concurrent = None
    if todo:
        scheduler = plan.spec.scheduler.type != "none"
        # With a scheduler, done trials replay their recorded metric history first, so ASHA's rungs hold them.
        names = ([n for n in (t.name for t in plan.trials) if n in final] if scheduler else []) + todo
        try:
            # The dashboard stays on: Train V2 in Tune needs the State API to clean up stopped trials' placement
            # groups.
            with ray_session(address, dashboard=True) as started_ray:
                import ray

                nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
                local = started_ray and not target_address(address)
                max_concurrent = _run_trials(plan, names, todo, parent, nodes, local, attempt, driver, echo)
        except KeyboardInterrupt:
            interrupted = True
    summary = _summarize(plan, state, driver, parent)
    statuses = [t["status"] for t in summary["trials"]]
    interrupted = interrupted or any(s in (INTERRUPTED, PENDING) for s in statuses)
    if interrupted:
        _close_unfinished(summary, tracker)
        summary["status"] = "INTERRUPTED"
    else:
        summary["status"] = FAILED if FAILED in statuses else FINISHED
    with contextlib.suppress(DCDiTError):
        tracker.log_text(parent, json.dumps(summary, indent=1, sort_keys=True, default=str), "sweep/summary.json")
        tracker.set_tags(parent, {"dcdit.sweep.status": summary["status"],
                                  "dcdit.sweep.finished": sum(s == FINISHED for s in statuses)})
        tracker.finish(parent, {"INTERRUPTED": "KILLED", FAILED: "FAILED"}.get(summary["status"], "FINISHED"))
    summary["max_concurrent_trials"] = max_concurrent
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    return summary


def _run_trials(plan: SweepPlan, names: list[str], todo: list[str], parent: str, nodes: list[dict], local: bool,
                attempt: int, driver: _Driver, echo: Callable[[str], None]) -> int:
    """Run `names` (the trials left, after any replays) on Tune; returns the max_concurrent_trials used."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from dcdit_platform.secrets import secret_env

    spec = plan.spec
    max_concurrent, warning = resolve_max_concurrent(spec.max_concurrent_trials, nodes, plan.footprint, len(todo),
                                                     local=local, autoscaling=spec.autoscaling)
    if warning:
        echo(f"warning: {warning}")
    echo(f"running {len(todo)} trial(s), at most {max_concurrent} at once ({plan.footprint.num_workers} worker(s) "
         f"x {plan.footprint.cpus_per_worker:g} CPU{' + GPU' if plan.footprint.gpus_per_worker else ''} each)")
    ctx = {"sweep_uri": plan.sweep_storage.uri, "storage_options": dataclasses.asdict(plan.storage.options),
           "tracking_uri": plan.tracking_uri, "parent_run_id": parent,
           "env": {**secret_env(), "MLFLOW_DISABLE_TELEMETRY": os.environ["MLFLOW_DISABLE_TELEMETRY"]},
           "trials": {t.name: t.tree for t in plan.trials},
           "evaluation": eval_protocol(spec.evaluation, plan.trials[0].config.resources)
           if spec.evaluation is not None else None,
           "scheduler_metric": spec.scheduler.metric if spec.scheduler.type != "none" else None}
    scheduler = None
    if spec.scheduler.type == "asha":
        s = spec.scheduler
        first = min(t.config.checkpoint.every for t in plan.trials)
        # ASHA stops every trial that reaches max_t; by default that lies past the longest trial, so trials that
        # are not cut at a rung end by finishing (and run their evaluation) rather than being stopped.
        scheduler = ASHAScheduler(time_attr="step", metric=s.metric, mode=s.mode,
                                  max_t=s.max_t or max(t.config.train.steps for t in plan.trials) + 1,
                                  grace_period=s.grace_period or first, reduction_factor=s.reduction_factor)
    storage = plan.sweep_storage
    storage.makedirs()
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), {"cpu": plan.footprint.trial_cpus})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(names)},
        # A finished trial's actor (a process that has imported torch) runs the next trial. Not with a scheduler:
        # Tune caches the actor of an early-stopped trial whose Train run would go on holding its workers.
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler,
                                    reuse_actors=scheduler is None,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=f"{TUNE_DIR}-{attempt:02d}", storage_path=storage.root,
            storage_filesystem=None if storage.is_local else storage.filesystem,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[_tune_callback_class()(driver)], verbose=0))
    # Tune prints its banner and Ray echoes worker output on stdout; stdout is for the summary (--json) only.
    with contextlib.redirect_stdout(sys.stderr):
        tuner.fit()
    return max_concurrent


def _summarize(plan: SweepPlan, state: SweepState, driver: _Driver, parent: str) -> dict:
    from dcdit_platform.runs import latest_checkpoint_state, read_run_record

    trials = []
    for t in plan.trials:
        record = state.trial(t.name)
        entry = {"name": t.name, "kind": t.kind, "overrides": _jsonable(t.overrides)}
        if record is not None:
            entry.update({k: record.get(k) for k in ("status", "step", "checkpoint", "mlflow_run_id", "metrics")})
            if record.get("evaluation") is not None:
                entry["evaluation"] = record["evaluation"]
            if record.get("error"):
                entry["error"] = record["error"]
            for key in ("resumed_from", "wall_s"):
                if record.get(key) is not None:
                    entry[key] = record[key]
        else:
            run = read_run_record(plan.sweep_storage, t.name)
            latest = latest_checkpoint_state(plan.sweep_storage.child(t.name))
            entry.update({"status": INTERRUPTED if run else PENDING, "step": latest[1].get("step") if latest else None,
                          "checkpoint": plan.sweep_storage.join(t.name, latest[0]) if latest else None,
                          "mlflow_run_id": run.get("mlflow_run_id") if run else None,
                          "metrics": dict(latest[1].get("metrics", {})) if latest else {}})
        trials.append(entry)
    return {"name": plan.name, "mlflow_run_id": parent, "tracking_uri": plan.display_tracking_uri,
            "experiment": plan.experiment, "storage": plan.sweep_storage.uri, "trials": trials}


def _close_unfinished(summary: dict, tracker) -> None:
    """The driver is stopping with trials unfinished: their runs are KILLED until --resume reopens them."""
    for trial in summary["trials"]:
        if trial["status"] == INTERRUPTED and trial.get("mlflow_run_id"):
            with contextlib.suppress(DCDiTError):
                if tracker.get_run(trial["mlflow_run_id"]).info.status == "RUNNING":
                    tracker.finish(trial["mlflow_run_id"], "KILLED")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _check_name(name: Any, where: str) -> str:
    from dcdit_platform.config import check_run_name

    if not isinstance(name, str):
        raise DCDiTError(f"{where}={name!r} must be a string")
    return check_run_name(name, where)


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise DCDiTError(f"{key}={value!r} {rule}")


__all__ = ["SweepSpec", "SchedulerSpec", "BaselineSpec", "TrialSpec", "SweepPlan", "TrialFootprint", "parse_sweep",
           "load_sweep", "expand_trials", "derive_baseline", "trials_that_fit",
           "resolve_max_concurrent", "run_sweep", "trial_main", "SweepState", "FINISHED", "STOPPED", "FAILED",
           "INTERRUPTED", "PENDING"]
