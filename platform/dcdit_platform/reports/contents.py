"""What a sweep report says, decided once: its sections (findings, runs, one ranked table per protocol, figures,
boundary maps, samples) as a reports.render Document, and its CSV records (one per run and evaluation entry).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dcdit_platform.reports.findings import FINDING_SECTIONS
from dcdit_platform.reports.protocols import PROTOCOL_KEYS, protocol_warning
from dcdit_platform.reports.records import Probe, ProtocolGroup, RunRow, Sweep
from dcdit_platform.reports.render import Bullets, Document, Figure, Gallery, Section, Table, Text
from dcdit_platform.reports.study import TABLE_HEADER as STUDY_HEADER
from dcdit_platform.reports.study import study_table

QUALITY_KEYS = ("fid", "fd", "sfid", "is_mean", "kid_mean", "kd_mean", "precision", "recall", "class_accuracy")
CSV_COLUMNS = ("run_id", "name", "status", "arch", "model", "N", "lambda", "params", "forward_gflops", "compression",
               "kept_fraction", "steps", "images_per_s", "diffusion_loss", "detail_auc", "detail_auc_clean",
               "protocol_id", "rank_in_protocol", "pareto", "rho", "distance", "gflops_per_image",
               *QUALITY_KEYS, "eval_slug", "eval_checkpoint", *(f"protocol.{k}" for k in PROTOCOL_KEYS))
RUN_HEADER = ("run", "arch", "model", "N", "lambda", "params", "GFLOPs/fwd", "compression", "steps", "images/s",
              "diff. loss", "detail AUC", "status")
PROBE_HEADER = ("t", "AUC", "95% interval", "kept", "kept on detail")
_METRIC_NAMES = {"kid_mean": "KID", "kd_mean": "KD", "precision": "precision", "recall": "recall", "is_mean": "IS",
                 "class_accuracy": "class acc.", "fid": "FID", "fd": "FD", "sfid": "sFID"}
_RUNS_CAPTION = ("GFLOPs/fwd: analytic FLOPs of one forward pass of one sample (DC-DiT at its realised kept fraction). "
                 "Compression, images/s and loss: the last logged values. Detail AUC: boundary probability vs the "
                 "ground-truth detail mask, averaged over the probed timesteps (0.5 = chance).")
_PARETO_CAPTION = ("DiT baselines as a line, DC-DiT points per (N, lambda); ringed: the Pareto front over all runs of "
                   "this protocol.")
_STUDY_CAPTION = ("One row per setting, its runs differing only in the seed: the mean, then each seed's value. FD: the "
                  "last evaluated checkpoint (no tail drop); last interval: its change since the checkpoint before "
                  "(flat within 10%: trained long enough). Compression: the router's own mask (before tail dropping), "
                  "last logged value. Detail AUC: the router probe on real images.")
_TIMESTEP_CAPTION = ("Solid: kept fraction per timestep bucket during training (mean over the second half). Dashed: "
                     "the router on held-out real images noised to each t. Right: AUC of the boundary probability "
                     "against the ground-truth detail masks, with a 95% bootstrap interval over images.")


def report_document(sweep: Sweep, facts: dict[str, list[str]], figures: dict[str, Path]) -> Document:
    """The whole report of a sweep: its findings (`facts`, from reports.findings) and figures (key -> PNG)."""
    meta = (f"MLflow parent run `{sweep.parent_id}` in experiment `{sweep.experiment}` at `{sweep.tracking_uri}`; "
            f"{len(sweep.rows)} run(s), {len(sweep.groups)} evaluation protocol(s).")
    findings = [Bullets(title, facts[key]) for title, key in FINDING_SECTIONS if facts.get(key)]
    sections = [Section("Findings", findings), *_study_sections(sweep, facts.get("study", []), figures),
                Section("Runs", [Table(RUN_HEADER, [run_cells(r) for r in sweep.rows]),
                                 Text(_RUNS_CAPTION, "caption")]),
                *_quality_sections(sweep, figures)]
    if "timestep" in figures:
        sections.append(Section("Kept fraction vs timestep, detail AUC", [
            Figure(figures["timestep"], "Kept fraction vs timestep, detail AUC", _TIMESTEP_CAPTION)]))
    if "loss" in figures:
        sections.append(Section("Loss curves", [Figure(figures["loss"], "Loss curves")]))
    probed = [r for r in sweep.rows if r.probe and r.probe.figure]
    if probed:
        sections.append(Section("Boundary maps on real samples"))
        sections += [_probe_section(row.name, row.probe) for row in probed]
    samples = [(Path(path), f"samples {r.name}", [r.name, slug])
               for r in sweep.rows for slug, path in r.samples.items()]
    if samples:
        sections.append(Section("Samples", [Gallery(samples)]))
    return Document(title=f"Sweep report: {sweep.name}", meta=meta, notes=list(sweep.notes), sections=sections)


def _study_sections(sweep: Sweep, answers: list[str], figures: dict[str, Path]) -> list[Section]:
    """The study's answers to the paper's claims a-f (`answers`, from reports.study), when the sweep is a study."""
    if not answers:
        return []
    blocks = [Bullets("Claims a-f, with the spread over seeds", answers), Table(STUDY_HEADER, study_table(sweep)),
              Text(_STUDY_CAPTION, "caption")]
    blocks += [Figure(figures[key], title) for key, title in (("study_fd", "FD at every checkpoint"),
                                                               ("study_router", "Router diagnostics in training"))
               if key in figures]
    return [Section("The paper's claims at this scale", blocks)]


def _quality_sections(sweep: Sweep, figures: dict[str, Path]) -> list[Section]:
    """One ranked table (and Pareto plot) per protocol, under a warning when there are several."""
    if not sweep.groups:
        return [Section("Quality", [Text("No run of this sweep has been evaluated yet (`dcdit eval CHECKPOINT`).")])]
    head = Section("Quality by evaluation protocol")
    if len(sweep.groups) > 1:
        head.blocks.append(Text(protocol_warning([g.protocol for g in sweep.groups]), "warning", "protocol-warning"))
    out = [head]
    for group in sweep.groups:
        section = Section(f"{group.id}: {group.title()}", [Table(*group_table(group))], level=3, anchor=group.id)
        if f"pareto_{group.id}" in figures:
            section.blocks.append(Figure(figures[f"pareto_{group.id}"], f"quality vs GFLOPs, {group.id}",
                                         _PARETO_CAPTION))
        out.append(section)
    return out


def _probe_section(name: str, probe: Probe) -> Section:
    p = probe.result
    rows = [[str(t), f"{a:.3f}", f"{lo:.3f}-{hi:.3f}", f"{100 * k:.1f}%", f"{100 * kd:.0f}%"]
            for t, a, lo, hi, k, kd in zip(p.timesteps, p.auc, p.auc_low, p.auc_high, p.kept, p.kept_on_detail)]
    caption = f"Checkpoint {probe.checkpoint} (step {probe.step}), EMA weights, {p.num_images} held-out images."
    return Section(name, [Table(PROBE_HEADER, rows), Figure(Path(probe.figure), f"boundary maps {name}", caption)],
                   level=3)


# --- table cells ------------------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def _params_text(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def run_cells(row: RunRow) -> list[str]:
    auc = row.probe.result.mean_auc if row.probe else None
    return [row.name, row.arch or "-", row.model or "-", _fmt(row.n), _fmt(row.lam), _params_text(row.params),
            _fmt(row.forward_gflops), _fmt(row.compression, 3), _fmt(row.steps), _fmt(row.images_per_s, 3),
            _fmt(row.diffusion_loss), _fmt(auc, 3), row.status]


def group_table(group: ProtocolGroup) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one protocol's table, best rank first; extra metric columns where any entry has them."""
    extra = [k for k in ("kid_mean", "kd_mean", "precision", "recall", "is_mean", "class_accuracy")
             if any(k in ev.metrics for _, ev in group.entries)]
    header = ["rank", "run", "arch", "N", "lambda", "rho", "GFLOPs/image", group.distance.upper(),
              *[_METRIC_NAMES[k] for k in extra], "compression", "Pareto"]
    order = sorted(range(len(group.entries)), key=lambda i: (group.ranks.get(i, 10**9), group.entries[i][0].name))
    rows = []
    for i in order:
        row, ev = group.entries[i]
        rows.append([_fmt(group.ranks.get(i)), row.name, row.arch or "-", _fmt(row.n), _fmt(row.lam), _fmt(ev.rho),
                     _fmt(ev.gflops, 4), _fmt(ev.quality, 5), *[_fmt(ev.metrics.get(k), 4) for k in extra],
                     _fmt(row.compression, 3), "yes" if i in group.pareto else ""])
    return header, rows


# --- CSV records ------------------------------------------------------------------------------------------------------

def csv_records(sweep: Sweep) -> list[dict[str, Any]]:
    """One record per (run, evaluation entry); a run without evaluations gets one record without quality columns."""
    positions = {(row.run_id, ev.slug, ev.rho): (group, i) for group in sweep.groups
                 for i, (row, ev) in enumerate(group.entries)}
    records = []
    for row in sweep.rows:
        base = {"run_id": row.run_id, "name": row.name, "status": row.status, "arch": row.arch, "model": row.model,
                "N": row.n, "lambda": row.lam, "params": row.params, "forward_gflops": row.forward_gflops,
                "compression": row.compression, "kept_fraction": row.kept_fraction, "steps": row.steps,
                "images_per_s": row.images_per_s, "diffusion_loss": row.diffusion_loss,
                "detail_auc": row.probe.result.mean_auc if row.probe else None,
                "detail_auc_clean": row.probe.result.clean_auc if row.probe else None}
        if not row.evaluations:
            records.append(base)
            continue
        for ev in row.evaluations:
            group, i = positions[(row.run_id, ev.slug, ev.rho)]
            records.append({**base, "protocol_id": group.id, "rank_in_protocol": group.ranks.get(i),
                            "pareto": i in group.pareto, "rho": ev.rho, "distance": ev.distance,
                            "gflops_per_image": ev.gflops, "eval_slug": ev.slug, "eval_checkpoint": ev.checkpoint,
                            **{k: ev.metrics.get(k) for k in QUALITY_KEYS},
                            **{f"protocol.{k}": ev.protocol.get(k) for k in PROTOCOL_KEYS}})
    return records
