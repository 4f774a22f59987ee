"""The report's figures, drawn with matplotlib's object API on the Agg canvas (as in dcdit.viz): quality vs GFLOPs
with the Pareto front per protocol, kept fraction and detail AUC vs timestep, loss and compression curves, the
study's FD curves and router diagnostics, and the boundary maps of a router probe on real samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from dcdit_platform.reports.ranking import finite
from dcdit_platform.reports.records import ProtocolGroup, RunRow, Sweep
from dcdit_platform.reports.study import fd_curve, settings


def draw_figures(sweep: Sweep, folder: Path) -> dict[str, Path]:
    """Every figure the sweep has data for, by key: `pareto_<protocol id>`, `timestep`, `loss`."""
    figures: dict[str, Path] = {}
    for group in sweep.groups:
        path = pareto_figure(group, folder / f"pareto_{group.id}.png")
        if path:
            figures[f"pareto_{group.id}"] = path
    for key, draw in (("timestep", timestep_figure), ("loss", loss_figure), ("study_fd", study_fd_figure),
                      ("study_router", study_router_figure)):
        path = draw(sweep.rows, folder / f"{key}.png")
        if path:
            figures[key] = path
    return figures


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _dress(ax, xlabel: str, ylabel: str, title: str, *, invert_x: bool = False, grid: str = "major",
           legend_size: int = 6) -> None:
    """Axis labels, a small title, a light grid and the legend, as every panel of the report has them."""
    if invert_x:
        ax.invert_xaxis()  # timesteps run noisy -> clean, as sampling does
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which=grid)
    ax.legend(fontsize=legend_size)


def _colours(n: int) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def boundary_figure(images: np.ndarray, masks: np.ndarray, probs: list[np.ndarray], timesteps: list[int],
                    path: Path, *, title: str = "", labels: Sequence[str] | None = None) -> Path:
    """Rows = real samples; columns = image, ground-truth detail mask, then p at each timestep (noisy -> clean)."""
    rows, cols = len(images), 2 + len(timesteps)
    fig = _figure(1.25 * cols + 0.9, 1.3 * rows + 0.6)
    grid = fig.add_gridspec(rows, cols, left=0.08, right=0.88, top=1 - 0.55 / (1.3 * rows + 0.6), bottom=0.03,
                            wspace=0.06, hspace=0.06)
    for r in range(rows):
        panels = [("image", images[r], None), ("detail mask", masks[r].astype(float), "gray")]
        panels += [(f"p at t={t}", probs[s][r], "magma") for s, t in enumerate(timesteps)]
        for c, (name, data, cmap) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            if cmap is None:
                ax.imshow(data, interpolation="nearest")
            else:
                ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
                if c >= 2:
                    ax.text(0.5, -0.02, f"{100 * float((data > 0.5).mean()):.0f}% kept", transform=ax.transAxes,
                            ha="center", va="top", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0 and labels is not None:
                ax.set_ylabel(labels[r], fontsize=7)
    cax = fig.add_axes((0.9, 0.15, 0.02, 0.7))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "magma"), cax=cax)
    bar.set_label("boundary probability p", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}: router on real samples vs detail (noisy -> clean)", fontsize=9)
    return _save(fig, path)


def pareto_figure(group: ProtocolGroup, path: Path) -> Path | None:
    """Quality vs GFLOPs per image for one protocol: baselines (models without a router) as a line, routed
    models' points per (N, lambda), the Pareto front (over all of them) as a dashed step line with ringed points."""
    points = [(i, row, ev) for i, (row, ev) in enumerate(group.entries) if finite(ev.gflops) and finite(ev.quality)]
    if not points:
        return None
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    baselines = sorted([(ev.gflops, ev.quality, row) for _, row, ev in points if not row.routed], key=lambda p: p[0])
    if baselines:
        ax.plot([p[0] for p in baselines], [p[1] for p in baselines], "-s", color="0.25", markersize=7,
                label="DiT baselines")
        for x, y, row in baselines:
            ax.annotate(row.model or row.name, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    settings = sorted({(row.n, row.lam, row.family.display_name) for _, row, _ in points if row.routed},
                      key=lambda s: (s[0] or 0, s[1] or 0, s[2]))
    markers = "o^Dvp*hX"
    for k, ((n, lam, family), colour) in enumerate(zip(settings, _colours(len(settings)))):
        mine = sorted((ev.gflops, ev.quality, ev.rho) for _, row, ev in points
                      if row.routed and (row.n, row.lam, row.family.display_name) == (n, lam, family))
        label = f"{family} N={n:g}" + (f", lambda={lam:g}" if lam is not None else "")
        ax.plot([p[0] for p in mine], [p[1] for p in mine], linestyle=":" if len(mine) > 1 else "none",
                marker=markers[k % len(markers)], color=colour, markersize=7, label=label)
        for x, y, rho in mine:
            if rho:
                ax.annotate(f"rho={rho:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
    front = sorted((group.entries[i][1].gflops, group.entries[i][1].quality) for i in group.pareto)
    if front:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", linestyle="--", color="tab:red", linewidth=1, alpha=0.7)
        ax.scatter(xs, ys, s=170, facecolors="none", edgecolors="tab:red", linewidths=1.2, label="Pareto front",
                   zorder=5)
    _dress(ax, "GFLOPs per generated image (measured while sampling)", f"{group.distance.upper()} (lower is better)",
           f"Quality vs compute - {group.id}", legend_size=7)
    fig.tight_layout()
    return _save(fig, path)


def timestep_figure(rows: list[RunRow], path: Path) -> Path | None:
    """Kept fraction vs diffusion timestep (training buckets and the probe on real images) and the detail AUC."""
    runs = [r for r in rows if r.routed and (r.kept_by_t or r.probe)]
    if not runs:
        return None
    with_probe = [r for r in runs if r.probe]
    fig = _figure(10.0 if with_probe else 5.5, 3.8)
    ax = fig.add_subplot(1, 2 if with_probe else 1, 1)
    for row, colour in zip(runs, _colours(len(runs))):
        if row.kept_by_t:
            ts, ks = zip(*row.kept_by_t.items())
            ax.plot(ts, ks, "-o", color=colour, markersize=4, label=f"{row.label} (training)")
        if row.probe:
            ax.plot(row.probe.result.timesteps, row.probe.result.kept, "--s", color=colour, markersize=4, alpha=0.8,
                    label=f"{row.label} (real images)")
        if row.n:
            ax.axhline(1.0 / row.n, color=colour, linewidth=0.6, linestyle=":", alpha=0.8)
    ax.set_ylim(bottom=0)
    _dress(ax, "diffusion timestep t (noisy -> clean)", "kept fraction of tokens",
           "Kept fraction vs timestep (dotted: target 1/N)", invert_x=True)
    if with_probe:
        ax2 = fig.add_subplot(1, 2, 2)
        for row, colour in zip(runs, _colours(len(runs))):
            if row.probe:
                p = row.probe.result
                ax2.plot(p.timesteps, p.auc, "-o", color=colour, markersize=4, label=row.label)
                ax2.fill_between(p.timesteps, p.auc_low, p.auc_high, color=colour, alpha=0.15)
        ax2.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance (0.5)")
        _dress(ax2, "diffusion timestep t (noisy -> clean)", "AUC of p vs detail mask",
               "Do boundaries follow detail? (95% interval)", invert_x=True)
    fig.tight_layout()
    return _save(fig, path)


def loss_figure(rows: list[RunRow], path: Path) -> Path | None:
    """Diffusion loss for every run (comparable across families) and realised compression for routed runs."""
    runs = [r for r in rows if r.histories.get("train/diffusion_loss") or r.histories.get("train/loss")]
    if not runs:
        return None
    dc = [r for r in runs if r.histories.get("router/compression_effective")]
    fig = _figure(10.0 if dc else 5.5, 3.6)
    ax = fig.add_subplot(1, 2 if dc else 1, 1)
    for row, colour in zip(runs, _colours(len(runs))):
        history = row.histories.get("train/diffusion_loss") or row.histories["train/loss"]
        steps, values = zip(*history)
        ax.plot(steps, values, color=colour, alpha=0.35, linewidth=0.8)
        ax.plot(steps, _smooth(values), color=colour, linewidth=1.5, label=f"{row.name}")
    ax.set_yscale("log")
    _dress(ax, "step", "diffusion loss", "Training loss (smoothed; faint: raw)", grid="both")
    if dc:
        ax2 = fig.add_subplot(1, 2, 2)
        colours = dict(zip([r.run_id for r in runs], _colours(len(runs))))
        for row in dc:
            steps, values = zip(*row.histories["router/compression_effective"])
            ax2.plot(steps, values, color=colours[row.run_id], label=row.label)
            if row.n:
                ax2.axhline(row.n, color=colours[row.run_id], linestyle=":", linewidth=0.8)
        ax2.set_yscale("log")
        _dress(ax2, "step", "realised compression (tokens / kept)", "Realised compression (dotted: target N)",
               grid="both")
    fig.tight_layout()
    return _save(fig, path)


def study_fd_figure(rows: list[RunRow], path: Path) -> Path | None:
    """The distance at every evaluated checkpoint of every run: one colour per setting, one line per seed."""
    found = [s for s in settings(rows) if any(len(fd_curve(r)) > 1 for r in s.rows)]
    if not found:
        return None
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for setting, colour in zip(found, _colours(len(found))):
        for i, row in enumerate(setting.rows):
            steps, values = zip(*fd_curve(row))
            ax.plot(steps, values, color=colour, marker="o", markersize=3, linewidth=1.2,
                    linestyle="-" if i == 0 else "--", label=setting.name if i == 0 else None)
    ax.set_yscale("log")
    _dress(ax, "step", "FD", "FD at every checkpoint (solid: first seed, dashed: others)", grid="both")
    fig.tight_layout()
    return _save(fig, path)


def study_router_figure(rows: list[RunRow], path: Path) -> Path | None:
    """The router's training diagnostics of every learned-router run: the compression its own mask realises, the
    ratio loss and the router's gradient norm, by step."""
    keys = (("router/compression_natural", "compression (router's mask)"), ("train/ratio_loss", "ratio loss"),
            ("optim/router_grad_norm", "router gradient norm"))
    runs = [r for r in rows if r.histories.get("optim/router_grad_norm")]
    if not runs:
        return None
    fig = _figure(12.0, 3.4)
    for i, (key, label) in enumerate(keys):
        ax = fig.add_subplot(1, 3, i + 1)
        for row, colour in zip(runs, _colours(len(runs))):
            if row.histories.get(key):
                steps, values = zip(*row.histories[key])
                ax.plot(steps, _smooth(values), color=colour, linewidth=1.2, label=row.name)
            if key == keys[0][0] and row.n:
                ax.axhline(row.n, color=colour, linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        _dress(ax, "step", label, label + (" (dotted: target N)" if i == 0 else ""), grid="both", legend_size=5)
    fig.tight_layout()
    return _save(fig, path)


def _smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out
