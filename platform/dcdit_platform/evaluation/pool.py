"""A pool of evaluation actors working through a list of tasks: dynamic assignment (an idle actor takes the next
task), results in task order whatever the completion order, and tasks lost with a dead actor recomputed on a fresh
one. Every task fixes what it computes, so a recomputed task gives the same result.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import ray

from dcdit.errors import DCDiTError
from dcdit_platform import console
from dcdit_platform.evaluation.actors import TaskError

_echo = console.echo("eval")


class ActorPool:
    """`size` actors made by `make_actor` (each with `pid()` and `run(task)` methods). A dead actor (killed, OOM,
    node lost) is replaced and its unfinished tasks go back to the queue; after `max_failures` replacements the
    evaluation stops with a DCDiTError. A `TaskError` result stops it too, with the error's message.

    `on_event` hears {"event": "shard_done", "task", "pid" (of the actor that computed it), "pids", "done",
    "total"} and {"event": "actor_replaced", "slot", "pids"}; `pids` maps actor slots to process ids.
    Use it as a context manager: the actors are killed on exit.
    """

    def __init__(self, size: int, make_actor: Callable[[], Any], *, max_failures: int = 4,
                 on_event: Callable[[dict], None] | None = None):
        self.make_actor, self.max_failures, self.on_event = make_actor, max_failures, on_event
        self.failures = 0
        self.actors = [make_actor() for _ in range(size)]
        self.generation = [0] * size  # bumped when a slot's actor is replaced
        self.pids = dict(enumerate(ray.get([a.pid.remote() for a in self.actors])))

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def run(self, tasks: list, *, per_actor: int = 2) -> Iterator[Any]:
        """Yield each task's result in task order; at most `per_actor` tasks wait at each actor."""
        queue = deque(range(len(tasks)))
        inflight: dict[Any, tuple[int, int, int, int]] = {}  # ref -> (task index, actor slot, its generation, pid)
        load = [0] * len(self.actors)
        done: dict[int, Any] = {}
        next_out = 0
        while next_out < len(tasks):
            for depth in range(1, per_actor + 1):  # breadth first: every actor gets work before any gets two
                for slot, actor in enumerate(self.actors):
                    if queue and load[slot] < depth:
                        i = queue.popleft()
                        inflight[actor.run.remote(tasks[i])] = (i, slot, self.generation[slot], self.pids[slot])
                        load[slot] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            i, slot, generation, pid = inflight.pop(ready[0])
            current = generation == self.generation[slot]
            if current:
                load[slot] -= 1
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:
                queue.appendleft(i)
                if current:
                    self._replace(slot, err)
                    load[slot] = 0
                continue
            if isinstance(result, TaskError):
                raise DCDiTError(result.message)
            done[i] = result
            if self.on_event:
                self.on_event({"event": "shard_done", "task": i, "pid": pid, "pids": dict(self.pids),
                               "done": len(done) + next_out, "total": len(tasks)})
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def _replace(self, slot: int, err: BaseException) -> None:
        self.failures += 1
        detail = " ".join(str(err).split())[:200]
        if self.failures > self.max_failures:
            raise DCDiTError(f"evaluation actors died {self.failures} times (last: {detail}); check memory and the "
                             "cluster's health")
        _echo(f"an actor died ({detail[:120]}); recomputing its shards on a fresh actor")
        with contextlib.suppress(Exception):
            ray.kill(self.actors[slot])
        self.actors[slot] = self.make_actor()
        self.generation[slot] += 1
        self.pids[slot] = ray.get(self.actors[slot].pid.remote())
        if self.on_event:
            self.on_event({"event": "actor_replaced", "slot": slot, "pids": dict(self.pids)})

    def shutdown(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
