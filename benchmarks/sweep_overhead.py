"""Sweep overhead: the wall time of a sweep (default: the smoke sweep) against the sum of its trials run alone.

    .venv/bin/python benchmarks/sweep_overhead.py [--sweep experiments/smoke-sweep.yaml] [--tracking-uri URI]

1. Every trial of the sweep is run alone, one after the other, with `dcdit train` on the trial's exact config
   (a fresh process and local Ray each, as a user would), and timed end to end.
2. The sweep itself runs with `dcdit sweep` (one local Ray, Tune, trials at once as the resources allow).
All runs track into one MLflow store (created before timing), so its one-time setup is counted in neither.
The table shows each trial alone (process wall, Ray start-up, Ray Train fit) next to its time inside the sweep
(its Tune trial function, start to record), then the totals: the sum of the trials alone, the sweep's wall time,
and the sweep's time beyond its longest trial.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dcdit_platform.sweeps import load_sweep
from dcdit_platform.tracking import Tracker, default_tracking_uri

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict) -> tuple[float, dict, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, summary, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(REPO / "experiments" / "smoke-sweep.yaml"))
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite in the benchmark's folder")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dcdit-sweep-bench-"))
    storage = work / "runs"
    tracking = args.tracking_uri or default_tracking_uri(str(storage))
    Tracker(tracking).experiment_id("sweep-bench-warmup")  # create the store's tables before timing
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    plan = load_sweep(args.sweep, storage=str(storage), tracking_uri=tracking)

    alone: dict[str, dict] = {}
    for trial in plan.trials:
        config = trial.config.to_dict()
        config["tracking"].update(experiment="sweep-bench-alone", parent_run_id=None, tags={})
        config["storage"]["uri"] = str(storage / "alone")
        path = work / f"{trial.name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        wall, summary, _ = run([str(BIN / "dcdit"), "train", str(path), "--name", trial.name, "--json"], env)
        alone[trial.name] = {"wall": wall, "ray": summary["ray_startup_s"], "fit": summary["wall_s"] - summary[
            "ray_startup_s"]}
        print(f"alone: {trial.name} {wall:.1f} s", file=sys.stderr, flush=True)

    wall, summary, _ = run([str(BIN / "dcdit"), "sweep", args.sweep, "--storage", str(storage), "--tracking-uri",
                            tracking, "-o", "tracking.experiment=sweep-bench", "--json"], env)
    in_sweep = {t["name"]: t.get("wall_s") for t in summary["trials"]}

    rows = [("trial", "alone: wall s", "alone: Ray start s", "alone: fit s", "in sweep: trial s")]
    for name, a in alone.items():
        rows.append((name, f"{a['wall']:.1f}", f"{a['ray']:.1f}", f"{a['fit']:.1f}",
                     f"{in_sweep[name]:.1f}" if in_sweep.get(name) is not None else "-"))
    total = sum(a["wall"] for a in alone.values())
    rows.append(("sum of trials alone", f"{total:.1f}", f"{sum(a['ray'] for a in alone.values()):.1f}",
                 f"{sum(a['fit'] for a in alone.values()):.1f}", ""))
    rows.append((f"sweep ({summary['max_concurrent_trials']} at once)", f"{wall:.1f}", "", "",
                 f"{max(v for v in in_sweep.values() if v is not None):.1f} (longest)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"sweep {summary['name']}: {len(plan.trials)} trials, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    longest = max(v for v in in_sweep.values() if v is not None)
    print(f"sweep wall / sum alone = {wall / total:.2f}; sweep beyond its longest trial: {wall - longest:.1f} s "
          "(driver start-up, Ray start-up, MLflow parent run, Tune scheduling)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
