"""The findings' sentences from hand-made rows: kept fraction vs timestep, realised compression, routed runs against
baselines under one protocol, runs that could not be probed, the caveats, and findings qualified by the strength
they have (runs too short for their EMA, evaluations with fewer samples than feature dimensions)."""

from __future__ import annotations

from dcdit.probe import RouterProbe
from dcdit_platform.reports.findings import findings
from dcdit_platform.reports.ranking import group_by_protocol
from dcdit_platform.reports.records import Probe, Sweep
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


def _probe(auc: float, low: float, high: float, step: int) -> Probe:
    result = RouterProbe(timesteps=[900, 100], auc=[auc, auc], auc_low=[low, low], auc_high=[high, high],
                         kept=[0.25, 0.26], kept_on_detail=[0.5, 0.5], detail_share=0.37, num_images=64,
                         mean_low=low, mean_high=high)
    return Probe(checkpoint="ckpt", step=step, result=result)


def test_runs_too_short_for_their_ema_are_marked_and_not_counted():
    # 0.98 ** 4 = 0.9224 of the EMA is still the initialisation (> 1/2): too short; 0.98 ** 200 = 0.0176: counted.
    short = report_row("n4-short", n=4.0, steps=4, config={"train.ema_decay": 0.98},
                       probe=_probe(0.513, 0.505, 0.52, 4))
    long = report_row("n4-long", n=4.0, steps=200, config={"train.ema_decay": 0.98},
                      probe=_probe(0.64, 0.6, 0.68, 200))
    facts = findings(_sweep([short, long]))
    assert facts["detail"][0].startswith("Boundaries follow the ground-truth detail masks in 1 of 1 DC-DiT runs")
    assert "; 1 more trained too briefly to count." in facts["detail"][0]
    assert facts["detail"][1].endswith("too short to tell what the router learned (after 4 steps its EMA weights are "
                                       "still 92% the initialisation (ema_decay 0.98); this is close to the untrained "
                                       "router).")
    assert facts["detail"][2].endswith(": boundaries follow detail.")
    assert "too short to compare with the paper's adaptivity (after 4 steps" in facts["timestep"][0]
    assert "too short" not in facts["timestep"][1] and "not the paper's adaptivity" in facts["timestep"][1]
    assert facts["caveats"][0].startswith("Too short to mean anything: n4-short (")


def test_only_short_runs_give_no_detail_verdict_and_tiny_evaluations_rank_nothing():
    # 34 steps at 0.98: 0.98 ** 34 = 0.503 > 1/2, still too short; 16 samples in the domain classifier's 128 dimensions.
    rows = [report_row("dit", "dit", steps=34, config={"train.ema_decay": 0.98},
                       evaluations=[evaluation(30.0, 4.0, num_samples=16)]),
            report_row("n4", n=4.0, steps=34, config={"train.ema_decay": 0.98}, probe=_probe(0.7, 0.6, 0.8, 34),
                       evaluations=[evaluation(20.0, 3.0, num_samples=16)])]
    facts = findings(_sweep(rows))
    assert facts["detail"][0].startswith("No DC-DiT run trained long enough to tell whether boundaries follow "
                                         "detail: after 34 steps its EMA weights are still 50% the initialisation")
    [quality] = facts["quality"]
    assert ": these numbers do not rank the runs: from 16 samples in 128 feature dimensions" in quality
    assert "dit, n4 trained too briefly" in quality and "Pareto" not in quality and "beat" not in quality
    assert quality.endswith("As measured: best FD 20 by n4.")


def test_enough_samples_and_steps_leave_the_findings_as_they_were():
    # 35 steps at 0.98: 0.98 ** 35 = 0.493 <= 1/2; 128 samples = the feature dimension.
    rows = [report_row("dit", "dit", steps=35, config={"train.ema_decay": 0.98},
                       evaluations=[evaluation(30.0, 4.0, num_samples=128)]),
            report_row("n4", n=4.0, steps=35, config={"train.ema_decay": 0.98},
                       evaluations=[evaluation(20.0, 3.0, num_samples=128)])]
    facts = findings(_sweep(rows))
    [quality] = facts["quality"]
    assert "do not rank" not in quality and "Pareto front" in quality
    assert not any(line.startswith("Too short") for line in facts["caveats"])
