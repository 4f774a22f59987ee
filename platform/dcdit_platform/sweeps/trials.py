"""Trial expansion: the grid's points, then the DiT baselines (named, or derived per N to match a routed model's
parameters or FLOPs), each crossed with the grid keys they share; every trial gets a readable unique name
("DC-DiT-B_N4_lam0.03", "DiT-B_2") and its config tree relative to the base experiment.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

from dcdit.baselines import default_patch_size, flop_matched_dit, param_matched_dit
from dcdit.errors import DCDiTError
from dcdit.models.family import family_of
from dcdit_platform.config import build_model_config, check_config_key, set_dotted
from dcdit_platform.sweeps.spec import BaselineSpec, SweepSpec, check_name

# How grid keys appear in trial names unless `labels:` says otherwise (the paper's symbols).
DEFAULT_LABELS = {"model.downsample_factor": "N", "train.chunking.ratio_loss_weight": "lam"}
# Train keys of routed models only (router losses, upcycling a DiT into a DC-DiT): a baseline without a router
# drops them, and grid keys on them do not cross the baselines.
DCDIT_TRAIN_KEYS = ("chunking", "init_from", "freeze_embedders", "cond_adaptor", "distill_steps", "distill_weight")
# A baseline keeps the data geometry of the base model.
GEOMETRY_FIELDS = ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob")
BASELINE_FAMILY = family_of("dit")  # what every baseline is
_MODEL_CHOICE = ("model", "model.preset")  # grid keys that choose whole models


@dataclass
class TrialSpec:
    """One trial: its readable name, what it changes relative to the base experiment, and its full config tree."""

    name: str
    kind: str  # a grid point (the base model's arch: "dcdit", or "dit" when the base is a DiT) or "baseline"
    overrides: dict[str, Any]  # dotted key -> value, relative to the base experiment + sweep overrides
    tree: dict[str, Any]  # the experiment config as a plain dict (before storage/tracking flags)
    config: Any = None  # the validated ExperimentConfig (with the sweep's storage/tracking)
    config_hash: str = ""
    note: str | None = None  # how a derived baseline was matched


@dataclass(frozen=True)
class _Baseline:
    """A baseline's model before it is crossed with the shared grid keys."""

    name: str
    model: dict[str, Any]  # the `model:` tree
    overrides: dict[str, Any]  # dotted keys of this baseline only
    summary: dict[str, Any]  # what it changes, for TrialSpec.overrides
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
    """The base model in trial names: its preset ("DC-DiT-B"), else its family's label ("DC-DiT", "DiT_2")."""
    model = tree.get("model")
    preset = model if isinstance(model, str) else (model or {}).get("preset")
    if preset:
        return preset.replace("/", "_")
    return family_of(model_config).label(model_config)


def baseline_fields(model_config) -> dict[str, Any]:
    """The base model's fields as a DiT baseline (the fields only other families read are dropped)."""
    return {**BASELINE_FAMILY.fields(model_config), "arch": BASELINE_FAMILY.arch}


def derive_baseline(model_config, n: float, how: str) -> dict[str, Any]:
    """Model fields of the DiT matched to the DC-DiT `model_config` at compression N (dcdit.baselines, rule
    "deepen"): patch sqrt(N) (N = 4 keeps as many backbone tokens as patch 2), same width, as many blocks as make
    its parameters (param_matched) or analytic forward MACs at 1/N kept tokens (flop_matched) closest."""
    reference = model_config.replace(downsample_factor=float(n))
    patch = default_patch_size(reference)
    if model_config.input_size % patch:
        raise DCDiTError(f"baselines derive: patch {patch} (the token count of N={n:g}) does not divide "
                         f"model.input_size={model_config.input_size}; derive needs N = p*p with p dividing it")
    matched = (param_matched_dit if how == "param_matched" else flop_matched_dit)(reference, patch_size=patch)
    return {**baseline_fields(model_config), "patch_size": matched.patch_size, "depth": matched.depth,
            "hidden_size": matched.hidden_size, "num_heads": matched.num_heads}


def expand_trials(spec: SweepSpec, common: dict[str, Any]) -> list[TrialSpec]:
    """The grid's trials in grid order, then the baselines; names are unique and readable."""
    first = copy.deepcopy(common)
    for key in spec.grid:  # a grid over whole models: the first one stands for the base
        if key in _MODEL_CHOICE:
            set_dotted(first, key, spec.grid[key][0])
    if "model" not in first:
        raise DCDiTError("the base experiment has no `model:`; set it there, in the sweep's overrides "
                         "(model.preset: DC-DiT-B) or in the grid (model: [DC-DiT-S, DC-DiT-B])")
    base_model, _ = build_model_config(first["model"])
    label = spec.label or model_label(first, base_model)
    trials = _grid_trials(spec, common, label, base_model.arch)
    baselines = [b for entry in spec.baselines for b in _baselines(entry, spec, base_model, label)]
    trials += _baseline_trials(baselines, spec, common, base_model)
    seen: set[str] = set()
    for trial in trials:
        check_name(trial.name, f"trial name {trial.name!r}")
        if trial.name in seen:
            raise DCDiTError(f"two trials would both be named {trial.name}: give baselines a `name:` or grid keys a "
                             "`labels:` entry that tells them apart")
        seen.add(trial.name)
    return trials


def _grid_trials(spec: SweepSpec, common: dict[str, Any], label: str, kind: str) -> list[TrialSpec]:
    keys = list(spec.grid)
    trials = []
    for values in itertools.product(*(spec.grid[k] for k in keys)) if keys else [()]:
        tree = copy.deepcopy(common)
        parts, head = [], label
        for key, value in zip(keys, values):
            set_dotted(tree, key, value)
            if key in _MODEL_CHOICE and isinstance(value, (str, dict)) and key not in spec.labels:
                head = format_value(value)
            else:
                parts.append(name_part(key, value, spec.labels))
        trials.append(TrialSpec(name="_".join([head, *parts]), kind=kind, overrides=dict(zip(keys, values)),
                                tree=tree))
    return trials


def _baselines(entry: BaselineSpec, spec: SweepSpec, base_model, label: str) -> list[_Baseline]:
    """The baselines one `baselines:` entry stands for (one per N and derivation for `derive:`)."""
    # The baselines' name stem: the label with the routed model's name swapped for the DiT's ("DC-DiT-B" -> "DiT-B").
    stem = label.replace("DC-DiT", "DiT", 1) if label.startswith("DC-DiT") else "DiT"
    if entry.derive:
        return _derived_baselines(entry.derive, spec, base_model, stem)
    geometry = {k: getattr(base_model, k) for k in GEOMETRY_FIELDS}
    if isinstance(entry.model, str):
        return [_Baseline(entry.name or entry.model.replace("/", "_"), {"preset": entry.model, **geometry},
                          entry.overrides, {"model.preset": entry.model, **entry.overrides})]
    model = dict(entry.model)
    if "preset" in model:
        tree_model = {**geometry, **model}
    else:
        tree_model = {**baseline_fields(base_model), **model}
    name = entry.name or f"{stem}_{tree_model.get('patch_size', base_model.patch_size)}"
    return [_Baseline(name, tree_model, entry.overrides,
                      {**{f"model.{k}": v for k, v in model.items()}, **entry.overrides})]


def _derived_baselines(derive: tuple[str, ...], spec: SweepSpec, base_model, stem: str) -> list[_Baseline]:
    if not family_of(base_model).routed:
        raise DCDiTError("baselines derive: needs a DC-DiT base experiment (the DiT is matched to it)")
    derived = []  # (n, name, fields, how)
    for n in spec.grid.get("model.downsample_factor") or [base_model.downsample_factor]:
        for how in derive:
            fields = derive_baseline(base_model, float(n), how)
            derived.append((n, f"{stem}_{fields['patch_size']}_{how.replace('_', '-')}", fields, how))
    names = [name for _, name, _, _ in derived]
    out = []
    for n, name, fields, how in derived:
        if names.count(name) > 1:  # two N with the same patch (N=4 and N=5 -> patch 2): say which N
            name += f"_N{format_value(n)}"
        summary = {"model.arch": fields["arch"], "model.patch_size": fields["patch_size"],
                   "model.depth": fields["depth"]}
        out.append(_Baseline(name, fields, {}, summary, f"{how} to DC-DiT N={format_value(n)}"))
    return out


def _baseline_trials(baselines: list[_Baseline], spec: SweepSpec, common: dict[str, Any],
                     base_model) -> list[TrialSpec]:
    """Each baseline crossed with the grid keys that apply to it (not those of routed models only)."""
    dropped = set(dataclasses.asdict(base_model)) - set(baseline_fields(base_model))
    shared = [k for k in spec.grid if k not in _MODEL_CHOICE and not _routed_only(k, dropped)]
    shared_values = list(itertools.product(*(spec.grid[k] for k in shared))) if shared else [()]
    trials = []
    for b in baselines:
        routed = _is_routed(b.model)
        for values in shared_values:
            tree = copy.deepcopy(common)
            tree["model"] = copy.deepcopy(b.model)
            if not routed:  # router losses and upcycling do not apply to a model without a router
                train = tree.setdefault("train", {})
                for key in DCDIT_TRAIN_KEYS:
                    train.pop(key, None)
            for key, value in b.overrides.items():
                set_dotted(tree, check_config_key(key, f"baseline {b.name} override"), value)
            parts = []
            for key, value in zip(shared, values):
                set_dotted(tree, key, value)
                parts.append(name_part(key, value, spec.labels))
            trials.append(TrialSpec(name="_".join([b.name, *parts]), kind="baseline",
                                    overrides={**b.summary, **dict(zip(shared, values))}, tree=tree, note=b.note))
    return trials


def _routed_only(key: str, dropped_model_fields: set[str]) -> bool:
    """A grid key that a baseline does not have: a model field only routed families read, or a router train key."""
    parts = key.split(".")
    if parts[0] == "model" and len(parts) > 1:
        return parts[1] in dropped_model_fields
    return parts[0] == "train" and len(parts) > 1 and parts[1] in DCDIT_TRAIN_KEYS


def _is_routed(model_tree: dict[str, Any]) -> bool:
    """Whether a baseline's model has a router. One that does not build counts as not routed here: `load_sweep`
    reports its error with the trial's name once the whole config is built."""
    with contextlib.suppress(DCDiTError):
        return family_of(build_model_config(model_tree)[0]).routed
    return False


__all__ = ["TrialSpec", "expand_trials", "derive_baseline", "baseline_fields", "format_value", "name_part",
           "model_label", "DEFAULT_LABELS", "DCDIT_TRAIN_KEYS", "GEOMETRY_FIELDS"]
