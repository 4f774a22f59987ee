"""Findings: what a sweep shows, in plain sentences: do the boundaries follow detail, how the kept fraction moves
with the timestep, realised vs target compression, the best run and the Pareto front per protocol, and caveats;
each with the strength it has (runs too short or evaluations too small to support it say so).
"""

from __future__ import annotations

from dcdit.features import DEFAULT_RECIPE, DOMAIN_EXTRACTOR, INCEPTION, INCEPTION_DIMS
from dcdit_platform.reports.protocols import protocol_warning
from dcdit_platform.reports.ranking import finite
from dcdit_platform.reports.records import Evaluation, ProtocolGroup, RunRow, Sweep
from dcdit_platform.reports.study import study_findings

# (title, key of findings()) in the order a report shows them
FINDING_SECTIONS = (("Do boundaries follow detail?", "detail"), ("Kept fraction vs timestep", "timestep"),
                    ("Realised compression vs target N", "compression"), ("Quality vs compute", "quality"),
                    ("Caveats", "caveats"))

# How strong a finding is, from the run's own numbers:
# - Samples, evaluations and router probes use the EMA weights, which start as the initialisation and still hold
#   ema_decay ** steps of it. Above EMA_INIT_SHARE they show the untrained model more than the trained one: a run
#   is "too short" then (at the quickstart's decay 0.98: fewer than 35 steps; its 200 steps keep 1.8%).
# - A Frechet distance from fewer samples than its features have dimensions has a singular sample covariance and is
#   mostly estimation bias, which differs from run to run: such distances do not rank runs (the evaluator warns at
#   the same point). Feature dimensions of the extractors whose size is known:
EMA_INIT_SHARE = 0.5
FEATURE_DIMS = {INCEPTION: INCEPTION_DIMS["pool"], DOMAIN_EXTRACTOR: DEFAULT_RECIPE["feature_dim"]}


def findings(sweep: Sweep) -> dict[str, list[str]]:
    """Plain statements about detail-following, kept fraction vs timestep and quality vs compute; for a study, its
    answers to the paper's claims a-f (reports.study, shown in a section of their own)."""
    routed = [r for r in sweep.rows if r.routed]
    quality = [line for group in sweep.groups for line in _quality(group)]
    if len(sweep.groups) > 1:
        quality.insert(0, protocol_warning([g.protocol for g in sweep.groups]))
    return {"detail": _detail(routed), "timestep": [line for row in routed for line in _timestep(row)],
            "compression": [_compression(r) for r in routed if r.n and finite(r.compression)],
            "quality": quality, "caveats": _caveats(sweep), "study": study_findings(sweep)}


def _families(rows: list[RunRow]) -> str:
    """The display names of the rows' model families ("DC-DiT"), for sentences about them."""
    return "/".join(sorted({r.family.display_name for r in rows if r.family})) or "model"


def ema_init_share(row: RunRow, step: int | None = None) -> float | None:
    """The share of the initial weights still in the run's EMA weights at `step` (default: its last step)."""
    decay, steps = row.config.get("train.ema_decay"), step if step is not None else row.steps
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or steps is None:
        return None
    return float(decay) ** int(steps)


def too_short(row: RunRow, step: int | None = None) -> str | None:
    """Why the run is too short for findings from its EMA weights, or None when it is not (or cannot be told)."""
    share = ema_init_share(row, step)
    if share is None or share <= EMA_INIT_SHARE:
        return None
    steps = step if step is not None else row.steps
    return (f"after {steps} steps its EMA weights are still {100 * share:.0f}% the initialisation "
            f"(ema_decay {row.config['train.ema_decay']:g})")


def too_few_samples(protocol: dict[str, str]) -> str | None:
    """Why distances under `protocol` do not rank runs (fewer samples than feature dimensions), or None."""
    dims = FEATURE_DIMS.get(protocol.get("extractor", ""))
    try:
        n = int(float(protocol.get("num_samples", "none")))
    except ValueError:
        return None
    if dims is None or n >= dims:
        return None
    return f"{n} samples in {dims} feature dimensions (below that the distance is mostly estimation bias)"


def _detail(routed: list[RunRow]) -> list[str]:
    out = []
    probed = [r for r in routed if r.probe]
    short = {r.name: too_short(r, r.probe.step) for r in probed}
    for row in probed:
        p = row.probe.result
        a = p.mean_auc
        by_t = ", ".join(f"{x:.2f} at t={t}" for t, x in zip(p.timesteps, p.auc))
        mid = len(p.timesteps) // 2
        verdict = (f"too short to tell what the router learned ({short[row.name]}; this is close to the untrained "
                   "router)" if short[row.name] else p.verdict)
        out.append(
            f"{row.name}: AUC {a:.3f} (95% interval {p.mean_low:.3f}-{p.mean_high:.3f}), {a - 0.5:+.3f} vs chance, "
            f"averaged over t in {{{', '.join(str(t) for t in p.timesteps)}}} ({by_t}). At t={p.timesteps[mid]}, "
            f"{100 * p.kept_on_detail[mid]:.0f}% of kept tokens lie on detail, which covers "
            f"{100 * p.detail_share:.0f}% of the image: {verdict}.")
    counted = [r for r in probed if not short[r.name]]
    if counted:
        follow = sum(r.probe.result.mean_low > 0.5 for r in counted)
        avoid = sum(r.probe.result.mean_high < 0.5 for r in counted)
        out.insert(0, f"Boundaries follow the ground-truth detail masks in {follow} of {len(counted)} "
                      f"{_families(counted)} runs (mean AUC of the boundary probability over the sampling timesteps "
                      f"above 0.5 with 95% confidence; 0.5 = chance)"
                      + (f"; in {avoid} they sit on flat regions instead (AUC below 0.5)" if avoid else "")
                      + (f"; {len(probed) - len(counted)} more trained too briefly to count" if len(counted) <
                         len(probed) else "") + ".")
    elif probed:
        out.insert(0, f"No {_families(probed)} run trained long enough to tell whether boundaries follow detail: "
                      f"{short[probed[0].name]}. Train longer (--steps) for this finding.")
    out += [f"{row.name}: not probed ({row.probe_note})." for row in routed if row.probe is None and row.probe_note]
    return out


def _timestep(row: RunRow) -> list[str]:
    """How the kept fraction moves from noisy to clean timesteps: on real images when probed, else in training."""
    if row.probe:
        ts, ks, source = row.probe.result.timesteps, row.probe.result.kept, "real images"
    elif row.kept_by_t:
        ts, ks = list(reversed(row.kept_by_t)), [row.kept_by_t[t] for t in reversed(row.kept_by_t)]
        source = "training batches"
    else:
        return []
    noisy, clean = ks[0], ks[-1]
    trend = ("rises" if clean > noisy * 1.05 else "falls" if clean < noisy * 0.95 else "stays flat")
    paper = {"rises": "the paper's direction (more tokens at clean steps, 22% -> 45%)",
             "falls": "the opposite of the paper's direction (22% -> 45% noisy -> clean)",
             "stays flat": "not the paper's adaptivity (22% -> 45% noisy -> clean)"}[trend]
    short = too_short(row, row.probe.step if row.probe else None)
    if short:
        paper = f"too short to compare with the paper's adaptivity ({short})"
    line = (f"{row.name}: kept fraction {trend} from {100 * noisy:.1f}% at t={ts[0]} (noisy) to "
            f"{100 * clean:.1f}% at t={ts[-1]} (clean) on {source}: {paper}.")
    if row.probe and row.kept_by_t:
        tk = list(row.kept_by_t)
        line += (f" During training: {100 * row.kept_by_t[tk[-1]]:.1f}% (t~{tk[-1]}) -> "
                 f"{100 * row.kept_by_t[tk[0]]:.1f}% (t~{tk[0]}).")
    if row.n:
        line += f" Target 1/N = {100 / row.n:.1f}%."
    return [line]


def _compression(row: RunRow) -> str:
    ratio = row.compression / row.n
    how = ("on target" if 0.8 <= ratio <= 1.25 else
           f"{ratio:.1f}x more than asked (the router keeps too few tokens)" if ratio > 1 else
           f"{1 / ratio:.1f}x less than asked (the router keeps too many tokens)")
    return (f"{row.name}: realised compression {row.compression:.2f} for target N={row.n:g} "
            f"(keeps {100 / row.compression:.1f}% of tokens, target {100 / row.n:.1f}%): {how}.")


def _quality(group: ProtocolGroup) -> list[str]:
    """The best entry of one protocol, its Pareto front, and whether routed points beat a baseline."""
    name = group.distance.upper()
    ranked = sorted(group.ranks.items(), key=lambda item: item[1])
    if not ranked:
        return []
    best_row, best_ev = group.entries[ranked[0][0]]
    few = too_few_samples(group.protocol)
    short = sorted({r.name for r, _ in group.entries if too_short(r)})
    if few or short:
        reasons = [f"from {few}"] if few else []
        reasons += [f"{', '.join(short)} trained too briefly (EMA weights still mostly the initialisation)"] if short \
            else []
        head = f"{group.id} ({group.title()}): these numbers do not rank the runs: {'; '.join(reasons)}."
        return [head + f" As measured: best {name} {best_ev.quality:.4g} by {_entry_label(best_row, best_ev)}."]
    text = (f"{group.id} ({group.title()}): best {name} {best_ev.quality:.4g} by {_entry_label(best_row, best_ev)}"
            + (f" at {best_ev.gflops:.3g} GFLOPs/image" if finite(best_ev.gflops) else "") + ".")
    front = [group.entries[i] for i in sorted(group.pareto, key=lambda i: group.entries[i][1].gflops)]
    if front:
        text += " Pareto front (cheapest first): " + ", ".join(
            f"{_entry_label(r, e)} ({e.gflops:.3g} GFLOPs, {name} {e.quality:.4g})" for r, e in front) + "."
    scored = [(r, e) for r, e in group.entries if finite(e.quality) and finite(e.gflops)]
    baselines = [(r, e) for r, e in scored if not r.routed]
    routed = [(r, e) for r, e in scored if r.routed]
    if baselines and routed:
        beat = [e for _, e in routed if any(e.quality < b.quality and e.gflops <= b.gflops * 1.05
                                            for _, b in baselines)]
        ours, theirs = _families([r for r, _ in routed]), _families([r for r, _ in baselines])
        text += (f" {len(beat)} of {len(routed)} {ours} points beat a {theirs} baseline with at most 5% more compute."
                 if beat else f" No {ours} point beats a {theirs} baseline at equal or lower compute here.")
    return [text]


def _caveats(sweep: Sweep) -> list[str]:
    out = []
    short = [r.name for r in sweep.rows if too_short(r)]
    if short:
        out.append(f"Too short to mean anything: {', '.join(short)} (a run counts as too short while its EMA weights, "
                   f"which samples, evaluations and probes use, still hold more than {100 * EMA_INIT_SHARE:.0f}% of "
                   "the initialisation: ema_decay ** steps); findings from them are marked and not counted.")
    steps = [r.steps for r in sweep.rows if r.steps]
    if steps and max(steps) < 5000:
        out.append(f"These runs trained for at most {max(steps)} steps: far from converged. The report shows what the "
                   "router does and how runs compare under one protocol; absolute quality numbers are not the paper's.")
    evaluated = [e for g in sweep.groups for _, e in g.entries]
    small = sorted({int(float(e.protocol["num_samples"])) for e in evaluated
                    if e.protocol.get("num_samples", "none") != "none" and float(e.protocol["num_samples"]) < 10000})
    if small:
        out.append(f"Distances from {', '.join(map(str, small))} samples are biased upwards and noisy (papers use "
                   "50K); compare them only within one protocol.")
    return out


def _entry_label(row: RunRow, ev: Evaluation) -> str:
    return row.name + (f" rho={ev.rho:g}" if ev.rho else "")
