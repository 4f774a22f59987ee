"""How many trials run at once: what one trial reserves (`TrialFootprint`), how many of them the cluster's nodes
hold with every bundle placed (`trials_that_fit`), and the `max_concurrent_trials` Tune gets from that, the sweep's
request and the trial count (`resolve_max_concurrent`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from dcdit.errors import DCDiTError


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

    def total(self) -> dict[str, float]:
        """The resources of all its bundles together."""
        total: dict[str, float] = {}
        for bundle in self.bundles():
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + v
        return total


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
        need = ", ".join(f"{k} {v:g}" for k, v in footprint.total().items())
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


__all__ = ["TrialFootprint", "trials_that_fit", "resolve_max_concurrent"]
