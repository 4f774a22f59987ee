"""The evaluator's Ray Data actor pool on the real local Ray cluster: results in task order whatever the completion
order (and none of Ray Data's own output on the terminal), a task whose actor dies recomputed on the restarted actor
with the same result, more deaths than max_failures a DCDiTError, a TaskError result a DCDiTError with its message,
at once, the actors then gone; Ray Data's settings (progress bars only with --verbose) only inside their block."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray.cloudpickle
import ray.data

from dcdit.errors import DCDiTError
from dcdit_platform import console
from dcdit_platform.evaluation.actors import TaskError
from dcdit_platform.evaluation.pool import ActorPool
from dcdit_platform.raycluster import ray_data_settings

# The worker class and its tasks travel to the Ray workers by value: this test module is not importable there.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Job:
    seed: int
    log: str  # a folder: each job that finishes writes done-SEED there; a job that dies writes died-SEED (its pid)
    after: int | None = None  # finish only once job `after` has
    die_once: bool = False  # the actor's process dies the first time it runs this job
    always_die: bool = False
    error: str | None = None


class Worker:
    """A stand-in for EvalWorker: a seeded draw per job; waits for another job, dies or reports an error when told
    to. Each process counts the jobs it starts (starts-PID), so a test can see what ran after an error."""

    def run(self, job: Job):
        log = Path(job.log)
        (log / f"starts-{os.getpid()}").open("a").write(f"{job.seed}\n")
        if job.always_die or (job.die_once and not (log / f"died-{job.seed}").exists()):
            (log / f"died-{job.seed}").write_text(str(os.getpid()))
            os._exit(1)
        if job.error:
            return TaskError(job.error)
        deadline = time.monotonic() + 120
        while job.after is not None and not (log / f"done-{job.after}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # waits for an event (the other job's file), not for a fixed time
        (log / f"done-{job.seed}").write_text(str(time.monotonic_ns()))
        return float(np.random.default_rng(job.seed).standard_normal(4).sum())


def expected(jobs: list[Job]) -> list[float]:
    return [float(np.random.default_rng(job.seed).standard_normal(4).sum()) for job in jobs]


def pool(size: int, **options) -> ActorPool:
    return ActorPool(size, Worker, cpus=0.5, **options)


def test_results_come_back_in_task_order_whatever_the_completion_order(ray_cluster, tmp_path, capfd):
    # Job 0 finishes only after job 5: the other actor computes jobs 1-5 meanwhile.
    jobs = [Job(seed=s, log=str(tmp_path), after=5 if s == 0 else None) for s in range(6)]
    delivered: list[int] = []
    results = list(pool(2, on_event=lambda e: delivered.append(e["task"])).run(jobs))
    assert results == expected(jobs) and delivered == list(range(6))
    finished = sorted(range(6), key=lambda s: int((tmp_path / f"done-{s}").read_text()))
    assert finished.index(0) > finished.index(5)  # completion order differed from task order
    err = capfd.readouterr().err
    assert "Dataset" not in err and "MapBatches(_Runner):" not in err  # Ray Data's bars and lines: --verbose only
    assert "core_worker.cc" not in err  # Ray's line about restartable actors stays in the session logs


def test_ray_data_settings_apply_inside_the_block_only():
    ctx = ray.data.DataContext.get_current()
    data_logger = logging.getLogger("ray.data")
    before = ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order
    with ray_data_settings(preserve_order=not before[2]):
        assert not ctx.enable_progress_bars and not ctx.print_on_execution_start
        assert ctx.execution_options.preserve_order is not before[2] and data_logger.level == logging.ERROR
    assert (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order) == before
    console.set_verbosity(verbose=True)
    try:
        with ray_data_settings():
            assert ctx.enable_progress_bars and ctx.print_on_execution_start
    finally:
        console.set_verbosity()


def test_a_task_whose_actor_dies_is_recomputed_on_the_restarted_actor(ray_cluster, tmp_path):
    jobs = [Job(seed=s, log=str(tmp_path), die_once=s == 2) for s in range(4)]
    events: list[dict] = []
    evaluation = pool(2, max_failures=1, on_event=events.append)
    results = list(evaluation.run(jobs))
    assert results == expected(jobs) and evaluation.failures == 1
    dead = int((tmp_path / "died-2").read_text())
    recomputed = next(e for e in events if e["task"] == 2)
    assert recomputed["restarted"] and recomputed["pid"] != dead  # by a new process of the actor


def test_more_deaths_than_max_failures_is_an_error(ray_cluster, tmp_path):
    with pytest.raises(DCDiTError, match=r"^evaluation actors failed \(1 restarts allowed per actor; last: The "):
        list(pool(1, max_failures=1).run([Job(seed=0, log=str(tmp_path), always_die=True)]))


def test_a_task_error_stops_the_run_at_once_with_its_message_and_the_actors_go(ray_cluster, tmp_path):
    jobs = [Job(seed=0, log=str(tmp_path), error="no such weights")] + [Job(seed=s, log=str(tmp_path))
                                                                        for s in range(1, 4)]
    with pytest.raises(DCDiTError, match="^no such weights$"):
        list(pool(1).run(jobs))
    (started,) = tmp_path.glob("starts-*")
    # Not retried: job 0 ran once (an exception raised in a task would be retried with the actor's tasks).
    assert started.read_text().split().count("0") == 1
    # Ray Data releases the pool when the run is abandoned: the actor's process ends (waited for, a minute at most).
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(int(started.name.split("-")[1])).wait(timeout=60)
