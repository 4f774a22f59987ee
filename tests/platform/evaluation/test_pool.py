"""The evaluator's actor pool on the real local Ray cluster: results in task order whatever the completion order, a
task whose actor dies recomputed on a fresh actor with the same result, more deaths than max_failures a DCDiTError,
a TaskError result a DCDiTError with its message, and the actors gone after the `with` block."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

from dcdit.errors import DCDiTError
from dcdit_platform.evaluation.actors import TaskError
from dcdit_platform.evaluation.pool import ActorPool

# The actor class and its tasks travel to the Ray workers by value: this test module is not importable there.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Job:
    seed: int
    delay: float = 0.0
    die_unless: str | None = None  # the actor dies unless this file exists, which it creates first (dies once)
    always_die: bool = False
    error: str | None = None


class Worker:
    """A stand-in for EvalWorker: a seeded draw per job, after a delay; dies or reports an error when told to."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: Job):
        if job.always_die:
            os._exit(1)
        if job.die_unless and not os.path.exists(job.die_unless):
            Path(job.die_unless).touch()
            os._exit(1)
        if job.error:
            return TaskError(job.error)
        time.sleep(job.delay)
        return float(np.random.default_rng(job.seed).standard_normal(4).sum())


def expected(jobs: list[Job]) -> list[float]:
    return [float(np.random.default_rng(job.seed).standard_normal(4).sum()) for job in jobs]


def make_worker(ray_cluster):
    remote = ray_cluster.remote(Worker).options(num_cpus=0.5, max_restarts=0)
    return remote.remote


def test_results_come_back_in_task_order_whatever_the_completion_order(ray_cluster):
    # Task 0 is slow, so tasks 1, 3, 5 (on the other actor) finish before it.
    jobs = [Job(seed=s, delay=1.0 if s == 0 else 0.05) for s in range(6)]
    finished: list[int] = []
    with ActorPool(2, make_worker(ray_cluster), on_event=lambda e: finished.append(e["task"])) as pool:
        results = list(pool.run(jobs))
    assert results == expected(jobs)
    assert finished[0] != 0 and sorted(finished) == list(range(6))  # completion order differed from task order


def test_a_task_whose_actor_dies_is_recomputed_on_a_fresh_actor(ray_cluster, tmp_path):
    jobs = [Job(seed=s) for s in range(4)]
    jobs[2] = Job(seed=2, die_unless=str(tmp_path / "died"))
    events: list[dict] = []
    with ActorPool(2, make_worker(ray_cluster), max_failures=1, on_event=events.append) as pool:
        before = set(pool.pids.values())
        results = list(pool.run(jobs))
        assert pool.failures == 1
    assert results == expected(jobs)
    replaced = [e for e in events if e["event"] == "actor_replaced"]
    assert len(replaced) == 1 and set(replaced[0]["pids"].values()) - before  # a new process
    (dead,) = before - set(replaced[0]["pids"].values())
    # The task went back to the queue and ran on a live actor (the fresh one or the survivor, whichever was free
    # first: both give the same result, which is the point), never reported from the dead one.
    recomputed = next(e for e in events if e["event"] == "shard_done" and e["task"] == 2)
    assert recomputed["pid"] != dead and recomputed["pid"] in replaced[0]["pids"].values()


def test_more_deaths_than_max_failures_is_an_error(ray_cluster):
    with ActorPool(1, make_worker(ray_cluster), max_failures=1) as pool:
        with pytest.raises(DCDiTError, match="evaluation actors died 2 times"):
            list(pool.run([Job(seed=0, always_die=True)]))


def test_a_task_error_stops_the_run_with_its_message(ray_cluster):
    with ActorPool(1, make_worker(ray_cluster)) as pool:
        with pytest.raises(DCDiTError, match="^no such weights$"):
            list(pool.run([Job(seed=0), Job(seed=1, error="no such weights")]))


def test_the_actors_are_gone_after_the_with_block(ray_cluster):
    with ActorPool(1, make_worker(ray_cluster)) as pool:
        actor = pool.actors[0]
    # ray.kill is asynchronous: a call sent before the kill reaches the actor may still run, so ask until it is
    # refused (an actor that was never killed answers every time and fails the test after the deadline).
    deadline = time.monotonic() + 60
    with pytest.raises(ray_cluster.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray_cluster.get(actor.pid.remote(), timeout=60)
            time.sleep(0.2)
