"""The evaluator's tasks on Ray Data: one row per task through `map_batches` on a fixed pool of actors, one task per
call (a task stays the unit of recomputation), results in task order. Ray restarts an actor that dies and runs its
unfinished tasks again there; every task fixes what it computes, so a recomputed task gives the same result.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import ray

from dcdit.errors import DCDiTError
from dcdit_platform import console
from dcdit_platform.evaluation.actors import TaskError
from dcdit_platform.raycluster import ray_data_settings

_echo = console.echo("eval")


class _Runner:
    """Ray Data's callable class, one per actor: sets up one `worker_class(*args)` (model, extractor) and computes a
    task per call; the result travels pickled, with the actor, the process that computed it and whether that
    process is a restart (Ray restarted the actor after its process died)."""

    def __init__(self, tasks: list, worker_class: type, args: tuple):
        self.tasks, self.worker = tasks, worker_class(*args)
        context = ray.get_runtime_context()
        self.origin = {"actor": [context.get_actor_id()], "pid": [os.getpid()],
                       "restarted": [bool(context.was_current_actor_reconstructed)]}

    def __call__(self, batch: dict) -> dict:
        (i,) = batch["task"]
        result = self.worker.run(self.tasks[int(i)])
        return {"task": [i], **self.origin, "result": [pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)]}


@ray.remote(num_cpus=0, max_retries=0)
def _execute(tasks: list, worker_class: type, args: tuple, size: int, remote_args: dict,
             verbose: bool) -> Iterator[dict]:
    """Ray Data's side of a run, as a Ray task streaming the rows back. The process that creates Ray Data's actors
    logs an error line for each (their constructor argument is in the object store and they restart: ray issues
    53727, 57733); in a worker it stays in Ray's session logs (raycluster filters it from forwarded output)."""
    console.set_verbosity(verbose=verbose)
    with ray_data_settings(preserve_order=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # max_restarts has no named parameter in Ray 2.60
        rows = ray.data.from_items([{"task": i} for i in range(len(tasks))], override_num_blocks=len(tasks))
        rows = rows.map_batches(_Runner, fn_constructor_args=(tasks, worker_class, args), batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=size), udf_modifying_row_count=False,
                                **remote_args)
        yield from rows.iter_rows()


class ActorPool:
    """`size` actors, each holding one `worker_class(*args)` (with a `run(task)` method) on `cpus` CPUs and `gpus`
    GPUs. Ray restarts an actor that dies (killed, OOM) up to `max_failures` times and reruns its unfinished tasks;
    one more death stops the evaluation with a DCDiTError, and so does a `TaskError` result, with its message.

    `failures` counts the restarted actor processes that computed a task (a restart after a death with no task
    lost is not seen). `on_event` hears {"event": "shard_done", "task", "actor", "pid" (the process that computed
    it), "restarted" (whether that process is a restart), "done", "total"}."""

    def __init__(self, size: int, worker_class: type, args: tuple = (), *, cpus: float = 1, gpus: float = 0,
                 max_failures: int = 4, on_event: Callable[[dict], None] | None = None):
        self.size, self.worker_class, self.args, self.on_event = size, worker_class, args, on_event
        # Ray's own retry of an actor's unfinished tasks on its restarted process (none without restarts).
        self.remote_args = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": max_failures,
                            "max_task_retries": -1 if max_failures else 0}
        self.max_failures = max_failures
        self.restarts: set[tuple[str, int]] = set()  # (actor id, pid) of the restarted processes seen

    @property
    def failures(self) -> int:
        return len(self.restarts)

    def run(self, tasks: list) -> Iterator[Any]:
        """Yield each task's result in task order (Ray Data's preserve_order), as soon as the ones before are in."""
        stream = _execute.options(num_returns="streaming").remote(
            tasks, self.worker_class, self.args, max(1, min(self.size, len(tasks))), self.remote_args,
            console.is_verbose())
        try:
            yield from self._results((ray.get(ref) for ref in stream), len(tasks))
        finally:
            ray.cancel(stream)  # a run stopped early (an error) ends: Ray Data releases its actors

    def _results(self, stream: Iterator[dict], total: int) -> Iterator[Any]:
        try:
            for done, row in enumerate(stream, 1):
                result = pickle.loads(row["result"])
                if isinstance(result, TaskError):
                    raise DCDiTError(result.message)
                origin = {"actor": row["actor"], "pid": int(row["pid"]), "restarted": bool(row["restarted"])}
                if origin["restarted"] and (origin["actor"], origin["pid"]) not in self.restarts:
                    self.restarts.add((origin["actor"], origin["pid"]))
                    _echo("an actor's process died; Ray restarted it and computed its shards again")
                if self.on_event:
                    self.on_event({"event": "shard_done", "task": int(row["task"]), **origin, "done": done,
                                   "total": total})
                yield result
        except ray.exceptions.RayActorError as err:  # also as the cause of _execute's RayTaskError
            detail = " ".join(str(getattr(err, "cause", None) or err).split())[:200]
            raise DCDiTError(f"evaluation actors failed ({self.max_failures} restarts allowed per actor; last: "
                             f"{detail}); check memory and the cluster's health") from None

