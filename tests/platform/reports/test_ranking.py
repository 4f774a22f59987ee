"""Ranking inside one protocol only, and the Pareto front of quality against GFLOPs."""

from __future__ import annotations

from dcdit_platform.reports.ranking import group_by_protocol, pareto_front
from helpers.reports import evaluation, report_row


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(0, 1.0, 10.0), (1, 2.0, 8.0), (2, 2.0, 9.0), (3, 3.0, 8.0), (4, 0.5, 12.0)]
    # 2 is beaten by 1 (same cost, lower distance); 3 by 1 (lower cost, same distance)
    assert pareto_front(points) == {0, 1, 4}
    assert pareto_front([]) == set() and pareto_front([(7, 1.0, 1.0), (8, 1.0, 1.0)]) == {7, 8}  # ties: both stay


def test_groups_rank_their_own_entries_and_the_largest_group_comes_first():
    rows = [report_row("dit", "dit", evaluations=[evaluation(30.0, 4.0), evaluation(15.0, 4.0, num_samples=64)]),
            report_row("n2", evaluations=[evaluation(20.0, 5.0), evaluation(25.0, 3.0, rho=0.4),
                                          evaluation(float("nan"), 2.0, rho=0.8)]),
            report_row("n8", evaluations=[evaluation(12.0, 1.5, num_samples=64)])]
    main, other = group_by_protocol(rows)
    assert [(r.name, e.rho) for r, e in main.entries] == [("dit", None), ("n2", None), ("n2", 0.4), ("n2", 0.8)]
    # FD 20 < 25 < 30; the NaN entry is neither ranked nor on the front
    assert main.ranks == {1: 1, 2: 2, 0: 3}
    assert main.pareto == {1, 2}  # (4 GFLOPs, FD 30) loses to (3, 25) on both axes
    assert [r.name for r, _ in other.entries] == ["dit", "n8"]
    assert other.ranks == {1: 1, 0: 2} and other.pareto == {1}
    assert main.id != other.id and main.protocol["num_samples"] == "256" and other.protocol["num_samples"] == "64"
