"""Ranking: evaluations grouped by protocol, ranked by distance inside each group only, and the Pareto front of
quality against GFLOPs per image (lower is better for both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dcdit_platform.reports.records import ProtocolGroup, RunRow


def finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def group_by_protocol(rows: list[RunRow]) -> list[ProtocolGroup]:
    """One group per distinct protocol; ranks and the Pareto front are computed inside each group only."""
    groups: dict[str, ProtocolGroup] = {}
    for row in rows:
        for ev in row.evaluations:
            group = groups.setdefault(ev.protocol_id, ProtocolGroup(ev.protocol_id, ev.protocol, []))
            group.entries.append((row, ev))
    for group in groups.values():
        scored = [(i, ev.quality) for i, (_, ev) in enumerate(group.entries) if finite(ev.quality)]
        for rank, (i, _) in enumerate(sorted(scored, key=lambda item: item[1]), start=1):
            group.ranks[i] = rank
        points = [(i, ev.gflops, ev.quality) for i, (_, ev) in enumerate(group.entries)
                  if finite(ev.gflops) and finite(ev.quality)]
        group.pareto = pareto_front(points)
    # The group holding the most runs first: it is the sweep's main protocol.
    return sorted(groups.values(), key=lambda g: (-len(g.entries), g.id))


def pareto_front(points: Sequence[tuple[int, float, float]]) -> set[int]:
    """Indices of the points no other point beats on both cost and distance (lower is better for both)."""
    front = set()
    for i, cost, dist in points:
        dominated = any((c <= cost and d <= dist) and (c < cost or d < dist) for j, c, d in points if j != i)
        if not dominated:
            front.add(i)
    return front
