"""The study's answers to the paper's claims (issue #11, a-f): a sweep's runs grouped into settings over seeds, each
claim with its numbers and their spread over seeds, whether it holds here, and for a claim that does not, what the
diagnostics logged in training show (FD curves, compression, ratio loss, router gradient, kept fraction by t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dcdit.baselines import default_patch_size, flop_matched_dit
from dcdit.config import ModelConfig
from dcdit_platform.reports.collect import model_config
from dcdit_platform.reports.records import RunRow, Sweep

# The goals #11 sets, and the paper's numbers they come from.
KEPT_RATIO_GOAL = 1.3  # (c) kept fraction clean / noisy; the paper 45.1% / 22.3% = 2.0
AUC_GOAL = 0.75  # (d) boundary probability vs the ground-truth detail masks
COMPRESSION_TOLERANCE = 0.12  # (e) the paper's realised compression: 4.49 at N=4, 17.2 at N=16 (B)
UPCYCLE_STEPS = 0.25  # (f) the upcycled run reaches the from-scratch FD in at most this share of its steps
FLAT = 0.10  # an FD curve whose last interval moves it by less than this share has flattened
ROUTER_KINDS = {"predictability": "learned", "cosine": "learned (cosine)", "random": "random", "grid": "grid"}
CLAIMS = ("a", "b", "c", "d", "e", "f")


@dataclass
class Setting:
    """One configuration of the study and its runs, one per seed."""

    name: str
    kind: str  # "learned", "random", "grid" (DC-DiT routers), "upcycled", "dit"
    config: ModelConfig
    rows: list[RunRow]
    matched_n: float | None = None  # a DiT FLOP-matched to the learned DC-DiT at this N

    def values(self, fn) -> list[float]:
        """fn(row) over the runs in seed order, dropping the runs that lack the value."""
        out = [fn(r) for r in sorted(self.rows, key=lambda r: r.config.get("seed") or 0)]
        return [float(v) for v in out if v is not None and math.isfinite(float(v))]


def settings(rows: list[RunRow]) -> list[Setting]:
    """Runs grouped by what they train (everything but the seed)."""
    parsed = [(row, model_config(row.config)) for row in rows]
    learned = [cfg for row, cfg in parsed if cfg is not None and row.routed and cfg.learned_router
               and not row.config.get("train.init_from")]
    groups: dict[str, Setting] = {}
    for row, cfg in parsed:
        if cfg is None:
            continue
        name, kind, matched = _describe(row, cfg, learned)
        groups.setdefault(name, Setting(name, kind, cfg, [], matched)).rows.append(row)
    return list(groups.values())


def _describe(row: RunRow, cfg: ModelConfig, learned: list[ModelConfig]) -> tuple[str, str, float | None]:
    if row.routed:
        n = f"N={cfg.downsample_factor:g}"
        if row.config.get("train.init_from"):
            return f"DC-DiT {n} upcycled", "upcycled", None
        kind = ROUTER_KINDS.get(cfg.router, cfg.router)
        lam = f", lambda {row.lam:g}" if cfg.learned_router and row.lam is not None else ""
        return f"DC-DiT {n} {kind}{lam}", kind.split()[0], None
    for dc in learned:
        patch = default_patch_size(dc)
        if (cfg.patch_size, cfg.hidden_size) == (patch, dc.hidden_size) and cfg.depth != dc.depth \
                and flop_matched_dit(dc, patch).depth == cfg.depth:
            return (f"DiT/{patch} FLOP-matched to N={dc.downsample_factor:g} ({cfg.depth} blocks)", "dit",
                    dc.downsample_factor)
    return f"DiT/{cfg.patch_size} ({cfg.depth} blocks)", "dit", None


# --- per-run values ------------------------------------------------------------------------------------------------

def final_fd(row: RunRow) -> float | None:
    """The distance of the run's last evaluated checkpoint (no tail drop)."""
    entries = [e for e in row.evaluations if e.rho is None and e.quality is not None]
    return entries[0].quality if entries else None


def gflops(row: RunRow) -> float | None:
    entries = [e for e in row.evaluations if e.rho is None and e.gflops is not None]
    return entries[0].gflops if entries else None


def fd_curve(row: RunRow) -> list[tuple[int, float]]:
    """(step, distance) of every evaluated checkpoint."""
    keys = [k for k in row.histories if k.startswith("eval/")]
    return sorted(row.histories[keys[0]]) if keys else []


def last_change(row: RunRow) -> float | None:
    """Relative change of the distance over the curve's last interval (negative: still improving)."""
    curve = fd_curve(row)
    if len(curve) < 2 or not curve[-2][1]:
        return None
    return (curve[-1][1] - curve[-2][1]) / curve[-2][1]


def last_value(row: RunRow, key: str) -> float | None:
    history = row.histories.get(key)
    return history[-1][1] if history else None


def kept_noisy_clean(row: RunRow) -> tuple[float, float, str] | None:
    """(noisy, clean, source) kept fractions: the router probe on real images, else the training buckets."""
    if row.probe:
        order = sorted(zip(row.probe.result.timesteps, row.probe.result.kept))
        return order[-1][1], order[0][1], "real images"
    if row.kept_by_t:
        ts = sorted(row.kept_by_t)
        return row.kept_by_t[ts[-1]], row.kept_by_t[ts[0]], "training batches"
    return None


# --- sentences -----------------------------------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:.3g}") -> str:
    """'mean (seed values)': the spread over seeds, shown whole."""
    if not values:
        return "-"
    inner = ", ".join(fmt.format(v) for v in values)
    return fmt.format(float(np.mean(values))) + (f" ({inner})" if len(values) > 1 else "")


def compare(lower: list[float], higher: list[float]) -> str:
    """Whether every seed of `lower` is below every seed of `higher` (lower is better)."""
    if not lower or not higher:
        return "cannot be told (runs without the value)"
    spread_note = "one seed, no spread to judge against" if min(len(lower), len(higher)) < 2 else \
        "beyond the spread over seeds"
    if max(lower) < min(higher):
        return "holds" + (f" ({spread_note})" if min(len(lower), len(higher)) < 2 else "")
    if max(higher) < min(lower):
        return f"does not hold (the other way round, {spread_note})"
    return "is not decided (the seeds overlap)"


def study_findings(sweep: Sweep) -> list[str]:
    """One or more sentences per claim a-f; empty when the sweep is not a study (no FLOP-matched DiT, router
    control or upcycled run to compare with)."""
    found = settings(sweep.rows)
    if not any(s.matched_n or s.kind in ("random", "grid", "upcycled") for s in found):
        return []
    out = _claim_a(found) + _claim_b(found) + _claim_c(found) + _claim_d(found) + _claim_e(found) + _claim_f(found)
    failing = [line for line in out if "does not hold" in line or "not decided" in line]
    if failing:
        out += [*_curve_diagnostics(found), *_router_diagnostics(found)]
    return out


def _learned(found: list[Setting], n: float | None = None) -> list[Setting]:
    return [s for s in found if s.kind == "learned" and (n is None or s.config.downsample_factor == n)]


def _claim_a(found: list[Setting]) -> list[str]:
    out = []
    for dit in [s for s in found if s.matched_n]:
        for dc in _learned(found, dit.matched_n):
            g_dc, g_dit = np.mean(dc.values(gflops) or [math.nan]), np.mean(dit.values(gflops) or [math.nan])
            compute = ("at equal or lower compute" if g_dc <= 1.05 * g_dit else
                       f"but DC-DiT spends {g_dc / g_dit:.2f}x its compute (not an equal-compute comparison)")
            out.append(f"(a) {dc.name}: FD {spread(dc.values(final_fd))} at {g_dc:.3g} GFLOPs/image vs {dit.name}: "
                       f"FD {spread(dit.values(final_fd))} at {g_dit:.3g}, {compute}. The paper's claim (DC-DiT "
                       f"better) {compare(dc.values(final_fd), dit.values(final_fd))}.")
    return out


def _claim_b(found: list[Setting]) -> list[str]:
    out = []
    for dc in _learned(found):
        n = dc.config.downsample_factor
        controls = [s for s in found if s.kind in ("random", "grid") and s.config.downsample_factor == n]
        if not controls:
            continue
        parts = [f"{s.name.split()[-1] if s.kind != 'learned' else 'learned'} FD {spread(s.values(final_fd))} "
                 f"(kept {spread(s.values(lambda r: r.kept_fraction), '{:.3f}')})" for s in [dc, *controls]]
        verdicts = [f"learned better than {s.kind}: {compare(dc.values(final_fd), s.values(final_fd))}"
                    for s in controls]
        out.append(f"(b) N={n:g} at the same budget: {'; '.join(parts)}. {'; '.join(verdicts)} (the paper, B N=4: "
                   "13.51 learned vs 16.69 random boundaries).")
    return out


def _claim_c(found: list[Setting]) -> list[str]:
    out = []
    for s in _learned(found) + [x for x in found if x.kind == "upcycled"]:
        pairs = [kept_noisy_clean(r) for r in sorted(s.rows, key=lambda r: r.config.get("seed") or 0)]
        pairs = [p for p in pairs if p]
        if not pairs:
            continue
        ratios = [clean / noisy for noisy, clean, _ in pairs if noisy > 0]
        verdict = "holds" if ratios and min(ratios) >= KEPT_RATIO_GOAL else "does not hold"
        out.append(f"(c) {s.name}: kept fraction {spread([100 * p[0] for p in pairs], '{:.1f}')}% at the noisiest "
                   f"timestep -> {spread([100 * p[1] for p in pairs], '{:.1f}')}% at the cleanest ({pairs[0][2]}), "
                   f"clean/noisy {spread(ratios, '{:.2f}')}; the goal >= {KEPT_RATIO_GOAL} (the paper: 22% -> 45%, "
                   f"2.0) {verdict}.")
    return out


def _claim_d(found: list[Setting]) -> list[str]:
    routed = [s for s in found if s.kind in ("learned", "random", "grid", "upcycled")]
    aucs = {s.name: s.values(lambda r: r.probe.result.mean_auc if r.probe else None) for s in routed}
    if not any(aucs.values()):
        return []
    shown = "; ".join(f"{name} {spread(v, '{:.3f}')}" for name, v in aucs.items() if v)
    learned = [v for s in routed if s.kind in ("learned", "upcycled") for v in aucs[s.name]]
    verdict = "holds" if learned and min(learned) >= AUC_GOAL else "does not hold"
    return [f"(d) detail AUC of the boundary probability (0.5 = chance; the controls are the chance reference): "
            f"{shown}. The goal >= {AUC_GOAL} for the learned routers {verdict}."]


def _claim_e(found: list[Setting]) -> list[str]:
    out = []
    for s in _learned(found) + [x for x in found if x.kind == "upcycled"]:
        n = s.config.downsample_factor
        realised = s.values(lambda r: last_value(r, "router/compression_natural"))
        if not realised:
            continue
        ok = all(abs(c / n - 1) <= COMPRESSION_TOLERANCE for c in realised)
        out.append(f"(e) {s.name}: realised compression {spread(realised, '{:.2f}')} for target N={n:g} "
                   f"(the router's own mask, before tail dropping); within {100 * COMPRESSION_TOLERANCE:.0f}% of N "
                   f"(the paper: 4.49 for 4, 17.2 for 16) {'holds' if ok else 'does not hold'}.")
    return out


def _claim_f(found: list[Setting]) -> list[str]:
    out = []
    for up in [s for s in found if s.kind == "upcycled"]:
        for scratch in _learned(found, up.config.downsample_factor):
            steps_up, steps_scratch = max(r.steps or 0 for r in up.rows), max(r.steps or 0 for r in scratch.rows)
            at_same = scratch.values(lambda r: _fd_at(r, steps_up))
            share = steps_up / steps_scratch if steps_scratch else math.nan
            verdict = compare(up.values(final_fd), scratch.values(final_fd))
            out.append(f"(f) {up.name} after {steps_up} steps ({100 * share:.0f}% of {steps_scratch}): FD "
                       f"{spread(up.values(final_fd))} vs {scratch.name} from scratch: FD "
                       f"{spread(scratch.values(final_fd))} after {steps_scratch}"
                       + (f" ({spread(at_same)} after {steps_up})" if at_same else "")
                       + f". Reaching the from-scratch FD in at most {100 * UPCYCLE_STEPS:.0f}% of its steps "
                       + (verdict if share <= UPCYCLE_STEPS + 1e-9 else "is not tested (the upcycled run is longer)")
                       + " (the paper: 8x fewer steps).")
    return out


def _fd_at(row: RunRow, step: int) -> float | None:
    return next((v for s, v in fd_curve(row) if s == step), None)


def _curve_diagnostics(found: list[Setting]) -> list[str]:
    out = []
    for s in found:
        curves = [fd_curve(r) for r in s.rows]
        if not any(len(c) > 1 for c in curves):
            continue
        changes = s.values(last_change)
        state = ("flattened" if changes and max(abs(c) for c in changes) < FLAT else "still moving")
        shown = "; ".join(" -> ".join(f"{v:.3g}@{step}" for step, v in c) for c in curves if c)
        moved = spread([100 * c for c in changes], "{:+.0f}")
        out.append(f"(diagnostics) FD by step, {s.name}: {shown}; last interval {moved}%: {state}.")
    return out


def _router_diagnostics(found: list[Setting]) -> list[str]:
    out = []
    for s in _learned(found) + [x for x in found if x.kind == "upcycled"]:
        for row in s.rows:
            comp, ratio = row.histories.get("router/compression_natural"), row.histories.get("train/ratio_loss")
            grad = row.histories.get("optim/router_grad_norm")
            if not comp:
                continue
            mid = comp[len(comp) // 2]
            text = (f"(diagnostics) {row.name}: natural compression {comp[0][1]:.2f}@{comp[0][0]} -> "
                    f"{mid[1]:.2f}@{mid[0]} -> {comp[-1][1]:.2f}@{comp[-1][0]} (target {s.config.downsample_factor:g})")
            if ratio:
                text += f"; ratio loss {ratio[0][1]:.3f} -> {ratio[-1][1]:.3f}"
            if grad:
                half = len(grad) // 2 or 1
                text += (f"; router gradient norm {np.mean([v for _, v in grad[:half]]):.3g} (first half) -> "
                         f"{np.mean([v for _, v in grad[half:]] or [math.nan]):.3g} (second half)")
            if row.kept_by_t:
                text += ("; kept fraction in training, clean -> noisy: "
                         + ", ".join(f"{100 * row.kept_by_t[t]:.0f}%" for t in sorted(row.kept_by_t)))
            out.append(text + ".")
    return out


# --- the table -----------------------------------------------------------------------------------------------------

TABLE_HEADER = ("setting", "seeds", "steps", "FD (mean; per seed)", "FD last interval", "GFLOPs/image",
                "kept fraction", "compression", "detail AUC")


def study_table(sweep: Sweep) -> list[list[str]]:
    """One row per setting: its numbers over seeds."""
    rows = []
    for s in settings(sweep.rows):
        rows.append([s.name, str(len(s.rows)), str(max(r.steps or 0 for r in s.rows)), spread(s.values(final_fd)),
                     spread([100 * c for c in s.values(last_change)], "{:+.0f}%"), spread(s.values(gflops)),
                     spread(s.values(lambda r: r.kept_fraction), "{:.3f}"),
                     spread(s.values(lambda r: last_value(r, "router/compression_natural")), "{:.2f}"),
                     spread(s.values(lambda r: r.probe.result.mean_auc if r.probe else None), "{:.3f}")])
    return rows


__all__ = ["Setting", "settings", "study_findings", "study_table", "TABLE_HEADER", "spread", "compare", "CLAIMS"]
