"""`dcdit study`: issue #11's CPU-scale study in one command, on an embedded Ray and a local MLflow store under one
folder (as the quickstart): the sweep of experiments/study/sweep.yaml, the upcycling runs of upcycle.yaml next to it
(claim f, children of the sweep's MLflow run), FD at every kept checkpoint (the curves), then the report.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcdit.config import from_dict
from dcdit.errors import DCDiTError
from dcdit_platform import console
from dcdit_platform.config import ExperimentConfig, build_config, check_config_key, load_yaml_tree, set_dotted
from dcdit_platform.quickstart import prepare_domain_extractor
from dcdit_platform.raycluster import ray_session
from dcdit_platform.runs import complete_checkpoints
from dcdit_platform.sweeps import FINISHED, eval_protocol, load_sweep, run_sweep
from dcdit_platform.sweeps.trials import name_part

DEFAULT_OUT = "dcdit-study"  # --out
UPCYCLE_FILE = "upcycle.yaml"  # next to the sweep file
SWEEP_COPY = "sweep.yaml"  # {out}/sweep.yaml: the sweep this study ran (the packaged one plus the size knobs)
_EVAL_KEY = re.compile(r"eval/(?:[^/]+/)?(fd|fid)$")  # a distance without a tail-drop sweep (eval/fd: the default)


@dataclass(frozen=True, kw_only=True)
class UpcycleSpec:
    """upcycle.yaml: which trial teaches, which setting it is upcycled into, and for how long."""

    teacher: str  # the sweep's DiT trial, without its seed part ("DiT-study_2")
    student: str  # the from-scratch DC-DiT trial it is compared with, without its seed part
    steps_fraction: float = 0.25  # of the student's train.steps
    distill_fraction: float = 0.25  # of the upcycled run's steps with the distillation term
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys on top of the student's config

    def validate(self) -> None:
        for key in ("steps_fraction", "distill_fraction"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                raise DCDiTError(f"upcycle.{key}={value} must be in (0, 1]")
        for key in self.overrides:
            check_config_key(key, "upcycle.overrides")


def default_sweep() -> Path:
    """experiments/study/sweep.yaml of this checkout (the package is installed editable from it)."""
    return Path(__file__).resolve().parents[2] / "experiments" / "study" / "sweep.yaml"


def load_upcycle_spec(path: str | os.PathLike) -> UpcycleSpec:
    if not Path(path).is_file():
        raise DCDiTError(f"{path} not found: the study's upcycling runs are described next to its sweep file")
    return from_dict(UpcycleSpec, load_yaml_tree(path), prefix="upcycle")


def write_sweep_copy(out: Path, base: Path, *, steps: int | None, seeds: int | None) -> Path:
    """{out}/sweep.yaml: `_base_` the study's sweep, its experiment path made absolute, and the size knobs: --steps
    rescales the steps, checkpoints (two: mid-run and last) and warm-ups; --seeds keeps the first seeds."""
    if not base.is_file():
        raise DCDiTError(f"study sweep {base} not found: pass --config experiments/study/sweep.yaml from a checkout")
    tree = load_yaml_tree(base)
    data: dict[str, Any] = {"_base_": str(base), "experiment": str((base.parent / tree["experiment"]).resolve())}
    if steps is not None:
        if steps < 8:
            raise DCDiTError(f"--steps must be >= 8 (two checkpoints and the warm-ups), got {steps}")
        data["overrides"] = {"train.steps": steps, "checkpoint.every": steps // 2,
                             "train.chunking.budget_warmup_steps": steps // 8, "train.warmup_steps": steps // 32}
    if seeds is not None:
        if seeds < 1:
            raise DCDiTError(f"--seeds must be >= 1, got {seeds}")
        data["grid"] = {"seed": list(range(seeds))}
    path = out / SWEEP_COPY
    text = "# Written by `dcdit study`: the sweep it ran.\n" + yaml.safe_dump(data, sort_keys=False)
    if path.is_file() and path.read_text() != text and (out / "runs").exists():
        raise DCDiTError(f"{out} holds a study run with other settings ({path}); choose another --out")
    path.write_text(text)
    return path


def seed_trial(plan, stem: str, seed: int):
    """The sweep's trial `stem` at `seed` (its name part for the seed as the sweep's labels spell it)."""
    name = f"{stem}_{name_part('seed', seed, plan.spec.labels)}"
    for trial in plan.trials:
        if trial.name == name:
            return trial
    raise DCDiTError(f"upcycle.yaml names trial {stem!r}, but the sweep has no trial {name}; its trials: "
                     f"{', '.join(t.name for t in plan.trials)}")


def upcycled_config(plan, spec: UpcycleSpec, seed: int, teacher_checkpoint: str,
                    parent_run_id: str | None) -> ExperimentConfig:
    """The upcycled run of `seed`: the student trial's config, a `steps_fraction` of its steps from the teacher's
    final EMA weights, the first `distill_fraction` of them distilling; tracked under the sweep's MLflow run."""
    student = seed_trial(plan, spec.student, seed)
    tree = copy.deepcopy(student.tree)
    steps = max(2, round(student.config.train.steps * spec.steps_fraction))
    name = f"{spec.student}_upcycled_{name_part('seed', seed, plan.spec.labels)}"
    tree["name"] = name
    for key, value in spec.overrides.items():
        set_dotted(tree, key, value)
    warmup = student.config.train.chunking.budget_warmup_steps
    for key, value in {"train.steps": steps, "train.distill_steps": max(1, round(steps * spec.distill_fraction)),
                       "train.init_from": f"{teacher_checkpoint.rstrip('/')}/ema.safetensors",
                       "checkpoint.every": max(1, steps // 2),
                       "train.chunking.budget_warmup_steps": round(warmup * spec.steps_fraction),
                       "tracking.parent_run_id": parent_run_id}.items():
        set_dotted(tree, key, value)
    tags = tree["tracking"].setdefault("tags", {})
    tags.update({"dcdit.trial": name, "dcdit.trial_kind": "upcycled",
                 "dcdit.upcycled_from": seed_trial(plan, spec.teacher, seed).name})
    return build_config(tree)


def run_upcycling(plan, spec: UpcycleSpec, summary: dict, echo: Callable[[str], None]) -> list[dict]:
    """Train the upcycled run of every seed of the sweep from its teacher trial's final checkpoint."""
    from dcdit_platform.training import plan_run, run_training

    records = {t["name"]: t for t in summary["trials"]}
    out = []
    for seed in sorted({t.config.seed for t in plan.trials}):
        teacher = records.get(seed_trial(plan, spec.teacher, seed).name, {})
        if teacher.get("status") != FINISHED or not teacher.get("checkpoint"):
            raise DCDiTError(f"teacher trial {seed_trial(plan, spec.teacher, seed).name} has not finished; run the "
                             "same command again to finish the sweep first")
        config = upcycled_config(plan, spec, seed, teacher["checkpoint"], summary.get("mlflow_run_id"))
        echo(f"upcycling {teacher['name']} into {config.name}: {config.train.steps} steps, "
             f"{config.train.distill_steps} distilling")
        result = run_training(plan_run(config, name=config.name), echo=lambda text: echo(f"  {text}"))
        out.append({"name": config.name, "mlflow_run_id": result["mlflow_run_id"], "status": FINISHED,
                    "checkpoint": result.get("checkpoint")})
    return out


def evaluated_steps(tracker, run_id: str) -> set[int]:
    """Checkpoint steps the run already has a distance for (any protocol without a tail-drop sweep)."""
    keys = [k for k in tracker.get_run(run_id).data.metrics if _EVAL_KEY.fullmatch(k)]
    return {int(m.step) for key in keys for m in tracker.metric_history(run_id, key)}


def evaluate_curves(plan, runs: list[dict], echo: Callable[[str], None]) -> int:
    """FD (the sweep's protocol) at every kept checkpoint of every run that has none yet: the curves that show
    whether training flattened. Two evaluation actors share the machine. Returns how many were evaluated."""
    from dcdit_platform.evaluation import EvalConfig, evaluate
    from dcdit_platform.tracking import Tracker

    protocol = {**eval_protocol(plan.spec.evaluation or {}, plan.trials[0].config.resources), "workers": None}
    tracker = Tracker(plan.tracking_uri)
    count = 0
    for run in runs:
        done = evaluated_steps(tracker, run["mlflow_run_id"])
        run_dir = plan.sweep_storage.child(run["name"])
        for dirname, state in complete_checkpoints(run_dir, newest_first=False):
            if int(state.get("step", -1)) in done:
                continue
            echo(f"FD of {run['name']} at step {state.get('step')}")
            evaluate(EvalConfig(checkpoint=plan.sweep_storage.join(run["name"], dirname),
                                tracking_uri=plan.tracking_uri, storage=plan.sweep_storage.uri, track=True,
                                **protocol), echo=lambda text: echo(f"  {text}"))
            count += 1
    return count


def run_study(out: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
              steps: int | None = None, seeds: int | None = None, echo: Callable[[str], None] | None = None) -> dict:
    """Run the study into `out` (or continue it there) and return its summary: timings per stage, the report."""
    from dcdit_platform.reports import build_report

    echo = echo or console.echo("study")
    started = time.perf_counter()
    out_dir = Path(out or DEFAULT_OUT).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(config).expanduser().resolve() if config else default_sweep()
    spec = load_upcycle_spec(base.parent / UPCYCLE_FILE)
    tracking_uri = f"sqlite:///{out_dir.as_posix()}/mlflow.db"
    plan = load_sweep(write_sweep_copy(out_dir, base, steps=steps, seeds=seeds), storage=str(out_dir / "runs"),
                      tracking_uri=tracking_uri)
    if plan.spec.evaluation is None:
        raise DCDiTError(f"{base} has no evaluation: the study compares runs by FD")
    timings = {}
    with ray_session(dashboard=True):
        prepare_domain_extractor(plan, echo)
        clock = time.perf_counter()
        summary = run_sweep(plan, resume=True, echo=echo)
        timings["sweep_s"] = round(time.perf_counter() - clock, 1)
        failed = [t["name"] for t in summary["trials"] if t.get("status") != FINISHED]
        if failed:
            raise DCDiTError(f"the study's sweep did not finish ({', '.join(failed)}); run the same command again")
        clock = time.perf_counter()
        upcycled = run_upcycling(plan, spec, summary, echo)
        timings["upcycling_s"] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        timings["curve_evaluations"] = evaluate_curves(plan, summary["trials"] + upcycled, echo)
        timings["curves_s"] = round(time.perf_counter() - clock, 1)
    clock = time.perf_counter()
    report = build_report(plan.name, tracking_uri=tracking_uri, out_dir=out_dir / "report", echo=echo)
    timings["report_s"] = round(time.perf_counter() - clock, 1)
    return {"out": str(out_dir), "sweep": plan.name, "mlflow_run_id": summary["mlflow_run_id"],
            "tracking_uri": tracking_uri, "report_html": report["report_html"], "report_md": report["report_md"],
            "study": report["findings"].get("study", []), "trials": summary["trials"], "upcycled": upcycled,
            "timings": timings, "wall_s": round(time.perf_counter() - started, 1)}


__all__ = ["run_study", "UpcycleSpec", "load_upcycle_spec", "upcycled_config", "write_sweep_copy", "seed_trial",
           "evaluate_curves", "default_sweep"]
