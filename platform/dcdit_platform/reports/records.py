"""What a report is made of: one row per MLflow run, its evaluations (one per protocol and tail-drop fraction),
the router probe of its checkpoint, evaluations grouped by protocol, and the sweep holding them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dcdit.models.family import FAMILIES, ModelFamily
from dcdit.probe import RouterProbe
from dcdit_platform.reports.protocols import protocol_id, protocol_title


@dataclass
class Evaluation:
    """One evaluation entry of one run: a protocol, an optional tail-drop fraction and its metrics."""

    slug: str
    rho: float | None
    protocol: dict[str, str]
    metrics: dict[str, float]
    checkpoint: str | None = None  # the evaluated checkpoint (a run may be evaluated at several)

    @property
    def protocol_id(self) -> str:
        return protocol_id(self.protocol)

    @property
    def distance(self) -> str | None:
        """'fid' (Inception features) or 'fd' (any other extractor, e.g. the synthetic domain classifier)."""
        return "fid" if "fid" in self.metrics else "fd" if "fd" in self.metrics else None

    @property
    def quality(self) -> float | None:
        return self.metrics.get(self.distance) if self.distance else None

    @property
    def gflops(self) -> float | None:
        return self.metrics.get("gflops_per_image")


@dataclass
class Probe:
    """The router probe of one run's checkpoint (EMA weights) and the boundary-map picture drawn from it."""

    checkpoint: str
    step: int | None
    result: RouterProbe
    figure: str | None = None  # boundary-map grid on real samples (PNG path)


@dataclass
class RunRow:
    """One MLflow run of the sweep, as the report shows it."""

    run_id: str
    name: str
    status: str
    arch: str | None
    model: str | None
    n: float | None  # target compression N (routed families only)
    lam: float | None  # ratio-loss weight lambda (routed families only)
    params: int | None
    forward_gflops: float | None
    compression: float | None
    kept_fraction: float | None
    steps: int | None
    images_per_s: float | None
    diffusion_loss: float | None
    evaluations: list[Evaluation] = field(default_factory=list)
    kept_by_t: dict[int, float] = field(default_factory=dict)  # bucket midpoint t -> kept fraction
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # parsed flat params
    tags: dict[str, str] = field(default_factory=dict)
    probe: Probe | None = None
    probe_note: str | None = None
    samples: dict[str, str] = field(default_factory=dict)  # eval slug -> sample grid PNG path

    @property
    def family(self) -> ModelFamily | None:
        """The run's model family; None when its params name no architecture this code knows."""
        return FAMILIES.get(self.arch) if self.arch else None

    @property
    def routed(self) -> bool:
        return self.family is not None and self.family.routed

    @property
    def label(self) -> str:
        if self.routed and self.n is not None:
            lam = f", lambda {self.lam:g}" if self.lam is not None else ""
            return f"N={self.n:g}{lam}"
        return self.model or self.name


@dataclass
class ProtocolGroup:
    """Evaluations that share a protocol: ranked together, and only with each other."""

    id: str
    protocol: dict[str, str]
    entries: list[tuple[RunRow, Evaluation]]
    ranks: dict[int, int] = field(default_factory=dict)  # index in entries -> rank (1 = best)
    pareto: set[int] = field(default_factory=set)  # indices on the quality/GFLOPs Pareto front

    @property
    def distance(self) -> str:
        names = {e.distance for _, e in self.entries if e.distance}
        return "fid" if names == {"fid"} else "fd"

    def title(self) -> str:
        return protocol_title(self.protocol)


@dataclass
class Sweep:
    parent_id: str
    name: str
    experiment: str
    tracking_uri: str
    rows: list[RunRow]
    groups: list[ProtocolGroup]
    notes: list[str] = field(default_factory=list)


def file_slug(text: str) -> str:
    """A run or sweep name as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"
