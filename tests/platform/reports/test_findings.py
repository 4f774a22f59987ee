"""The findings' sentences from hand-made rows: kept fraction vs timestep, realised compression, routed runs against
baselines under one protocol, runs that could not be probed, and the caveats."""

from __future__ import annotations

from dcdit_platform.reports.findings import findings
from dcdit_platform.reports.ranking import group_by_protocol
from dcdit_platform.reports.records import Sweep
from helpers.reports import evaluation, report_row


def _sweep(rows) -> Sweep:
    return Sweep(parent_id="p", name="s", experiment="e", tracking_uri="u", rows=rows, groups=group_by_protocol(rows))


def test_findings_of_a_small_sweep():
    rows = [report_row("dit", "dit", steps=12, evaluations=[evaluation(30.0, 4.0)]),
            report_row("n4", n=4.0, lam=0.1, compression=4.4, steps=12, kept_by_t={100: 0.30, 900: 0.20},
                       evaluations=[evaluation(20.0, 3.0), evaluation(40.0, 2.0, rho=0.4)]),
            report_row("n8", n=8.0, compression=16.0, steps=10, kept_by_t={100: 0.10, 900: 0.10},
                       probe_note="no readable checkpoint")]
    facts = findings(_sweep(rows))
    assert facts["detail"] == ["n8: not probed (no readable checkpoint)."]
    assert facts["timestep"] == [
        "n4: kept fraction rises from 20.0% at t=900 (noisy) to 30.0% at t=100 (clean) on training batches: the "
        "paper's direction (more tokens at clean steps, 22% -> 45%). Target 1/N = 25.0%.",
        "n8: kept fraction stays flat from 10.0% at t=900 (noisy) to 10.0% at t=100 (clean) on training batches: not "
        "the paper's adaptivity (22% -> 45% noisy -> clean). Target 1/N = 12.5%."]
    assert facts["compression"] == [
        "n4: realised compression 4.40 for target N=4 (keeps 22.7% of tokens, target 25.0%): on target.",
        "n8: realised compression 16.00 for target N=8 (keeps 6.2% of tokens, target 12.5%): 2.0x more than asked "
        "(the router keeps too few tokens)."]
    [quality] = facts["quality"]
    assert quality.endswith(": best FD 20 by n4 at 3 GFLOPs/image. Pareto front (cheapest first): n4 rho=0.4 "
                            "(2 GFLOPs, FD 40), n4 (3 GFLOPs, FD 20). 1 of 2 DC-DiT points beat a DiT baseline with "
                            "at most 5% more compute.")
    assert facts["caveats"][0].startswith("These runs trained for at most 12 steps: far from converged.")
    assert facts["caveats"][1].startswith("Distances from 256 samples are biased upwards")


def test_no_routed_point_beating_a_baseline_is_said_and_mixed_protocols_are_flagged_first():
    rows = [report_row("dit", "dit", evaluations=[evaluation(10.0, 4.0), evaluation(5.0, 4.0, num_samples=64)]),
            report_row("n2", n=2.0, evaluations=[evaluation(12.0, 4.1)])]
    quality = findings(_sweep(rows))["quality"]
    assert quality[0].startswith("WARNING: 2 different evaluation protocols (they differ in samples)")
    assert quality[1].endswith(" No DC-DiT point beats a DiT baseline at equal or lower compute here.")
    assert "DC-DiT" not in quality[2]  # the other protocol holds no routed run
