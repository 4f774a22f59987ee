"""`load_sweep`: a sweep file read, expanded and checked before Ray starts (every trial's config built and hashed,
one resource footprint for all, the evaluation protocol validated), as a `SweepPlan`; and `eval_protocol`, the
sweep's evaluation settings as `EvalConfig` keyword arguments.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcdit.config import from_dict
from dcdit.errors import DCDiTError
from dcdit_platform.config import (StorageSection, TrackingSection, apply_overrides, build_config, check_config_key,
                                   defining_file, load_yaml_tree, set_dotted)
from dcdit_platform.secrets import redact
from dcdit_platform.storage import open_storage
from dcdit_platform.sweeps.placement import TrialFootprint
from dcdit_platform.sweeps.spec import TRIAL_CPUS, SweepSpec, check_name, parse_sweep
from dcdit_platform.sweeps.trials import TrialSpec, expand_trials

# EvalConfig fields a sweep's protocol may not set: the sweep decides them per trial.
EVAL_FIXED = ("checkpoint", "storage", "tracking_uri", "track", "address", "export_npz")


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
        return redact(self.tracking_uri)

    def trial(self, name: str) -> TrialSpec:
        return next(t for t in self.trials if t.name == name)


def load_sweep(path: str | os.PathLike, *, name: str | None = None, overrides: Sequence[str] = (),
               storage: str | None = None, tracking_uri: str | None = None) -> SweepPlan:
    """Read, expand and validate a sweep: every trial's config is built and checked here (no Ray)."""
    path = str(path)
    source = load_yaml_tree(path)
    spec = parse_sweep(source, path)
    common = _common_tree(spec, path, overrides)
    if storage is not None:
        set_dotted(common, "storage.uri", storage)
    if tracking_uri is not None:
        set_dotted(common, "tracking.uri", tracking_uri)
    common.pop("name", None)

    sweep_name = check_name(name or spec.name or _stem(path), "--name" if name else "name")
    # MLflow (about 1 s of imports) only once the sweep file parsed: `dcdit sweep` reports a bad file without it.
    from dcdit_platform.tracking import TRACKING_ENV, resolve_tracking_uri

    storage_section = from_dict(StorageSection, common.get("storage") or {}, prefix="storage")
    tracking_section = from_dict(TrackingSection, common.get("tracking") or {}, prefix="tracking")
    root = open_storage(storage_section.uri, storage_section.options() or None)
    if tracking_section.uri is None and not root.is_local and not os.environ.get(TRACKING_ENV):
        raise DCDiTError(f"storage {storage_section.uri} is on S3, so the sweep needs an MLflow tracking server: pass "
                         f"--tracking-uri http://HOST:PORT (or set tracking.uri or {TRACKING_ENV})")
    resolved_tracking = resolve_tracking_uri(tracking_section.uri, root.uri)
    trials = expand_trials(spec, common)
    warnings = _build_trial_configs(trials, sweep_name, root.join(sweep_name), resolved_tracking)
    base = trials[0].config
    res = base.resources
    if res.min_workers != res.max_workers:
        raise DCDiTError(f"a sweep's trials need a fixed resources.num_workers (Tune packs trials by their size), "
                         f"got the range {list(res.num_workers)}; set one count")
    footprint = TrialFootprint(num_workers=res.num_workers, cpus_per_worker=res.cpus_per_worker,
                               gpus_per_worker=res.gpus_per_worker if res.use_gpu else 0.0,
                               trial_cpus=float(spec.resources.get("trial_cpus", TRIAL_CPUS)))
    if spec.scheduler.type == "asha":
        _check_eval_metric(spec, trials)
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


def _check_eval_metric(spec: SweepSpec, trials: list[TrialSpec]) -> None:
    """ASHA on eval/...: every trial must evaluate during training, else it never reports the metric."""
    metric = spec.scheduler.metric
    off = [t.name for t in trials if metric.startswith("eval/") and not t.config.evaluation.every]
    if off:
        raise DCDiTError(f"scheduler.metric={metric!r} is scored during training only with evaluation.every > 0, "
                         f"which trial {off[0]} does not set; add overrides: {{evaluation.every: K}} (a multiple of "
                         "checkpoint.every) or rank by a training metric")


def _common_tree(spec: SweepSpec, path: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The base experiment's tree with the sweep's overrides and resources, then the command line's overrides."""
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
    for key, value in spec.resources.items():
        if key != "trial_cpus":  # the trial actor's own CPUs, not a resources.* key of the experiment
            set_dotted(common, f"resources.{check_config_key(f'resources.{key}', 'resources').split('.', 1)[1]}",
                       value)
    return common


def _build_trial_configs(trials: list[TrialSpec], sweep_name: str, sweep_uri: str, tracking_uri: str) -> list[str]:
    """Give every trial its name, the sweep's storage and tracking, and its checked config; returns the warnings."""
    warnings: list[str] = []
    for trial in trials:
        tree = copy.deepcopy(trial.tree)
        tree["name"] = trial.name
        set_dotted(tree, "storage.uri", sweep_uri)
        set_dotted(tree, "tracking.uri", tracking_uri)
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
    return warnings


def eval_protocol(protocol: dict[str, Any], resources) -> dict[str, Any]:
    """The sweep's evaluation settings as EvalConfig keyword arguments (validated); workers default to the trial's."""
    # The evaluator (about 2 s of imports: feature extractors, plotting) only for sweeps that evaluate.
    from dcdit_platform.evaluation import EvalConfig

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


__all__ = ["SweepPlan", "load_sweep", "eval_protocol", "EVAL_FIXED"]
