"""Evaluation during training (`evaluation.every`): rank 0 hands each due checkpoint to a background Ray task that
runs `evaluate()` on its EMA weights while training goes on, collects the results without waiting, reports the
newest to Ray Train (a sweep's ASHA decides on eval/fd), and at the end of the run waits for the last ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dcdit.errors import DCDiTError
from dcdit_platform import console
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.evaluation import EvalConfig, evaluate
from dcdit_platform.raycluster import ray_session
from dcdit_platform.runs import checkpoint_name
from dcdit_platform.tracking import Tracker
from dcdit_platform.training.checkpointer import collective
from dcdit_platform.training.sessions import Session

_log = logging.getLogger("dcdit.train")

# What a result keeps of an evaluation summary (dcdit_platform.evaluation): the metrics, where the full result lies,
# and the per-rho results of a tail-drop sweep.
EVAL_METRICS = ("fid", "fd", "sfid", "is_mean", "is_std", "kid_mean", "kid_std", "kd_mean", "kd_std", "precision",
                "recall", "class_accuracy")
EVAL_KEYS = (*EVAL_METRICS, "num_samples", "step", "slug", "result_uri", "sweep")
EVAL_STEP = "eval/step"  # the training step an evaluation scored: ASHA's time attribute for eval/* metrics
LAG_METRIC = "eval/lag_steps"  # steps trained while the evaluation of a step ran (logged at that step)
BEHIND = 2  # evaluations in flight beyond which a warning says they fall behind training
# EvaluationSection fields that are EvalConfig fields of the same name (all but `every`).
PROTOCOL_FIELDS = ("num_samples", "sampler", "sample_steps", "cfg_scale", "reference", "extractor", "weights", "seed",
                   "batch_size", "shard_size", "workers", "cpus_per_worker", "metrics")


def time_attribute(metric: str) -> str:
    """The result key ASHA measures progress by for `metric`: the evaluated step for eval/* metrics (reported with
    a lag, after their evaluation ends), else the training step (monotonic across resumes, unlike Tune's own)."""
    return EVAL_STEP if metric.startswith("eval/") else "step"


def evaluation_steps(every: int, start: int, steps: int) -> list[int]:
    """The steps a run trained from `start` to `steps` evaluates: the multiples of `every` and the last step, never
    `start` or before (a resumed run does not repeat a step it evaluated before it stopped); none when every=0."""
    if every <= 0:
        return []
    due = list(range((start // every + 1) * every, steps + 1, every))
    if steps > start and (not due or due[-1] != steps):
        due.append(steps)
    return due


def eval_config(config: ExperimentConfig, checkpoint: str, **where: Any) -> EvalConfig:
    """The run's protocol (`evaluation:`) applied to `checkpoint`; `where`: tracking_uri, storage, address."""
    e = config.evaluation
    return EvalConfig(checkpoint=checkpoint, track=True, **{k: getattr(e, k) for k in PROTOCOL_FIELDS}, **where)


def check_protocol(config: ExperimentConfig) -> None:
    """Refuse a protocol `dcdit eval` would refuse, before the run starts, naming the evaluation.* key."""
    if not config.evaluation.every:
        return
    cfg = eval_config(config, "-")
    try:
        cfg.validate()
        cfg.check_model(config.model)
    except DCDiTError as err:  # its messages name dcdit eval's flags, which are these keys
        raise DCDiTError(re.sub(r"--([a-z-]+)", lambda m: "evaluation." + m[1].replace("-", "_"), str(err))) from None


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """What an evaluation task is given (through the object store: the config's tracking URI and `env` may hold
    credentials)."""

    config: EvalConfig
    env: dict[str, str]
    label: str = "eval"  # its progress lines read `dcdit <label>: ...`


def launch(request: EvalRequest) -> ray.ObjectRef:
    """`evaluate(request.config)` as a Ray task; its result is the summary's EVAL_KEYS.

    Outside any placement group: Tune captures a trial's child tasks into its group and Ray Train's workers hold
    theirs; neither has room for the evaluator's actors, which take free CPUs (or GPUs) of the cluster."""
    task = ray.remote(num_cpus=0)(_evaluate).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return task.remote(ray.put(request))


def _evaluate(request: EvalRequest) -> dict:
    for key, value in request.env.items():
        os.environ.setdefault(key, value)
    result = evaluate(request.config, echo=console.echo(request.label))
    return {k: v for k, v in result.items() if k in EVAL_KEYS}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


class PeriodicEvaluator:
    """Rank 0's background evaluations of one run: launched after each due checkpoint is saved, every one at once
    (each loads its checkpoint as it starts, so none depends on checkpoint.keep), collected as they finish."""

    def __init__(self, config: ExperimentConfig, *, name: str, run_uri: str, storage_uri: str, tracking_uri: str,
                 run_id: str, env: dict[str, str], start: int):
        self.config, self.name, self.run_uri, self.run_id = config, name, run_uri.rstrip("/"), run_id
        self.where = {"tracking_uri": tracking_uri, "storage": storage_uri}
        self.env, self.tracker = env, Tracker(tracking_uri, retry_timeout_s=5.0)
        self.steps = set(evaluation_steps(config.evaluation.every, start, config.train.steps))
        self.running: dict[ray.ObjectRef, int] = {}
        self.newest: dict | None = None  # the newest result's metrics (eval/..., eval/step)
        self.reported = True  # whether Ray Train has been told `newest`
        self._ray = contextlib.ExitStack()

    def due(self, step: int) -> bool:
        return step in self.steps

    def launch(self, step: int) -> None:
        """Start the evaluation of the checkpoint saved at `step`; a failure to start is a warning."""
        try:
            if not ray.is_initialized():  # an in-process run (run_local): a local Ray for the evaluations
                self._ray.enter_context(ray_session(None))
            request = EvalRequest(config=eval_config(self.config, f"{self.run_uri}/{checkpoint_name(step)}",
                                                     **self.where), env=self.env, label="train eval")
            self.running[launch(request)] = step
        except Exception as err:  # noqa: BLE001 - an evaluation never stops training
            _log.warning("[%s] the evaluation of step %d did not start: %s", self.name, step, _one_line(err))
            return
        if len(self.running) > BEHIND:
            _log.warning("[%s] %d evaluations are running at once (steps %s): they fall behind training; raise "
                         "evaluation.every or lower evaluation.num_samples", self.name, len(self.running),
                         ", ".join(map(str, sorted(self.running.values()))))

    def poll(self, step: int) -> None:
        """Collect the evaluations that have finished, without waiting."""
        if self.running:
            done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
            for ref in done:
                self._collect(ref, step)

    def report(self) -> dict:
        """The newest result Ray Train has not been told yet (eval/fd, eval/step, ...), or {}."""
        if self.reported or self.newest is None:
            return {}
        self.reported = True
        return dict(self.newest)

    def finish(self, step: int) -> dict:
        """Wait for every running evaluation (the run's last score is the one a sweep ranks it by); returns the
        newest result's metrics."""
        for ref in sorted(self.running, key=self.running.get):
            ray.wait([ref], num_returns=1)
            self._collect(ref, step)
        self.close()
        return dict(self.newest or {})

    def close(self) -> None:
        """Cancel what still runs (a run that stops early or fails: nobody waits for its scores)."""
        for ref in self.running:
            with contextlib.suppress(Exception):  # already finished, or gone with its worker
                ray.cancel(ref, force=True)
        self.running.clear()
        self._ray.close()

    def _collect(self, ref: ray.ObjectRef, step: int) -> None:
        evaluated = self.running.pop(ref)
        try:
            result = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a failed evaluation is a warning, never the run's end
            _log.warning("[%s] the evaluation of step %d failed: %s", self.name, evaluated, _one_line(err))
            return
        metrics = {f"eval/{k}": float(v) for k, v in result.items() if k in EVAL_METRICS and is_number(v)}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        _log.info("[%s] evaluation of step %d: %s (%d steps trained meanwhile)", self.name, evaluated, shown,
                  step - evaluated)
        with contextlib.suppress(DCDiTError):  # the lag is a diagnostic: an unreachable server costs only it
            self.tracker.log_metrics(self.run_id, {LAG_METRIC: step - evaluated}, evaluated)
        if self.newest is None or evaluated >= self.newest[EVAL_STEP]:
            self.newest, self.reported = {**metrics, EVAL_STEP: evaluated}, False


def report_last(session: Session, evaluator: PeriodicEvaluator | None, step: int) -> dict:
    """A collective at the end of a run with evaluation.every: rank 0 waits for its evaluations, then every rank
    reports rank 0's newest result to Ray Train (a sweep's scheduler sees the last score); returns it."""
    metrics = evaluator.finish(step) if evaluator is not None else {}
    collective(session, lambda: session.report(metrics))
    return metrics


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    cause = text.rsplit("DCDiTError: ", 1)[-1]  # a task's error text holds its traceback; ours ends it
    return (cause or type(err).__name__)[:400]


__all__ = ["PeriodicEvaluator", "EvalRequest", "launch", "evaluation_steps", "time_attribute", "is_number",
           "eval_config", "check_protocol", "report_last", "EVAL_METRICS", "EVAL_KEYS", "EVAL_STEP", "LAG_METRIC"]
