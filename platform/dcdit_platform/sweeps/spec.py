"""The sweep YAML schema: `SweepSpec` (base experiment, grid over dotted config keys, baselines, scheduler,
resources, evaluation) with its `SchedulerSpec` and `BaselineSpec`, and `parse_sweep`, which rejects unknown keys
and bad values with a message naming the key and the fix. Trial expansion and config checks come after it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from dcdit.config import from_dict
from dcdit.errors import DCDiTError, did_you_mean
from dcdit_platform.config import check_run_name

DERIVATIONS = ("param_matched", "flop_matched")
TRIAL_CPUS = 0.01  # the Tune trial's own actor only waits on its Train run; its workers reserve their own CPUs


@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    """Early stopping: none, or ASHA on a reported metric with `time_attr="step"` (monotonic across resumes;
    Tune's training_iteration restarts after one). Train reports at checkpoint steps, so ASHA decides there. On an
    evaluation metric (eval/fd, eval/fid: the trials' `evaluation.every` scores them during training), it decides
    by the evaluated step, when each evaluation's result comes back."""

    type: typing.Literal["none", "asha"] = "none"
    metric: str = "train/loss"
    mode: typing.Literal["min", "max"] = "min"
    grace_period: int | None = None  # steps before a trial can be stopped; None = the first checkpoint step
    reduction_factor: float = 3.0
    max_t: int | None = None  # trials reaching it are stopped; None = past the longest trial's train.steps

    def validate(self) -> None:
        _need(bool(self.metric), "scheduler.metric", self.metric, "must name a reported metric, e.g. train/loss")
        _need(self.grace_period is None or self.grace_period >= 1, "scheduler.grace_period", self.grace_period,
              "must be >= 1")
        _need(self.reduction_factor > 1, "scheduler.reduction_factor", self.reduction_factor, "must be > 1")
        _need(self.max_t is None or self.max_t >= 1, "scheduler.max_t", self.max_t, "must be >= 1")

    @property
    def reported_metric(self) -> str | None:
        """The metric the scheduler decides on, or None without a scheduler."""
        return self.metric if self.type != "none" else None


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
    label: str | None = None  # the base model in trial names; default its preset ("DC-DiT-B") or its family's label
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
            check_name(self.name, "name")
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


_TOP_KEYS = tuple(f.name for f in dataclasses.fields(SweepSpec))
_MAPPINGS = ("overrides", "grid", "labels", "resources")
_SCALARS = {"experiment": str, "name": str, "label": str, "max_concurrent_trials": int, "max_failures": int,
            "autoscaling": bool}


def parse_sweep(data: dict[str, Any], where: str = "sweep") -> SweepSpec:
    """A `SweepSpec` from the YAML mapping (after `_base_`), rejecting unknown keys with a suggestion."""
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
    for key in _MAPPINGS:
        if data.get(key) is None:
            data.pop(key, None)
        elif not isinstance(data[key], dict):
            raise DCDiTError(f"{key} must be a mapping, got {type(data[key]).__name__}")
    if "evaluation" in data and data["evaluation"] is not None and not isinstance(data["evaluation"], dict):
        raise DCDiTError(f"evaluation must be a mapping of evaluation settings or null, got {data['evaluation']!r}")
    sched = from_dict(SchedulerSpec, scheduler, prefix="scheduler")
    parsed_baselines = [_parse_baseline(b, i) for i, b in enumerate(baselines)]
    scalars = {k: v for k, v in data.items() if k not in (*_MAPPINGS, "evaluation")}
    _check_scalar_types(scalars)
    spec = SweepSpec(scheduler=sched, baselines=parsed_baselines, grid=dict(data.get("grid", {})),
                     overrides=dict(data.get("overrides", {})), labels=dict(data.get("labels", {})),
                     resources=dict(data.get("resources", {})), evaluation=data.get("evaluation"), **scalars)
    spec.validate()
    return spec


def _check_scalar_types(values: dict[str, Any]) -> None:
    for key, value in values.items():
        want = _SCALARS[key]
        if value is None and key != "experiment":
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
        check_name(name, f"{where}.name")
    model = item.get("model")
    if model is not None and not isinstance(model, (str, dict)):
        raise DCDiTError(f"{where}.model={model!r} must be a preset name or a mapping of model fields")
    spec = BaselineSpec(name=name, model=model, overrides=dict(overrides), derive=tuple(derive))
    spec.validate()
    return spec


def check_name(name: Any, where: str) -> str:
    """A sweep, baseline or trial name: a string that is a valid run name (it names MLflow runs and folders)."""
    if not isinstance(name, str):
        raise DCDiTError(f"{where}={name!r} must be a string")
    return check_run_name(name, where)


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise DCDiTError(f"{key}={value!r} {rule}")


__all__ = ["SweepSpec", "SchedulerSpec", "BaselineSpec", "parse_sweep", "check_name", "DERIVATIONS", "TRIAL_CPUS"]
