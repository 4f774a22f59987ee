"""The speed goals of issue 2, item 9, from one `dcdit bench` run: DiT-S/2 and DC-DiT-S in fp32 and bf16 next to
diffusers' DiT, and the ratios the goals are stated in.

    .venv/bin/python benchmarks/model_speed.py [--batch 8] [--repeats 5] [--warmup 2] [--threads N]
                                               [--clock wall|cpu] [--profile] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from dcdit_platform.perf.speed import BenchSettings, format_table, run_benchmark


def _goals(clock: str):
    """(description, value from (results by (model, precision), machine rates), target) for each goal (issue 2;
    DC-DiT's share of DiT's FLOP rate raised to 0.90 by issue 14)."""
    step, rate = ("step_ms", "gflops_per_s") if clock == "wall" else ("step_cpu_ms", "gflops_per_cpu_s")
    return (
        ("DiT-S/2 fp32 rate / machine fp32 matmul rate", lambda r, m: r["DiT-S/2", "fp32"][rate] / m["fp32"], 0.60),
        ("diffusers DiT-S/2 fp32 step / DiT-S/2 fp32 step",
         lambda r, m: r["DiT-S/2 (diffusers)", "fp32"][step] / r["DiT-S/2", "fp32"][step], 1.0),
        ("DiT-S/2 fp32 step / bf16 step", lambda r, m: r["DiT-S/2", "fp32"][step] / r["DiT-S/2", "bf16"][step], 1.8),
        ("DC-DiT-S fp32 step / bf16 step", lambda r, m: r["DC-DiT-S", "fp32"][step] / r["DC-DiT-S", "bf16"][step],
         1.8),
        ("DC-DiT-S fp32 rate / DiT-S/2 fp32 rate",
         lambda r, m: r["DC-DiT-S", "fp32"][rate] / r["DiT-S/2", "fp32"][rate], 0.90),
        ("DC-DiT-S bf16 rate / DiT-S/2 bf16 rate",
         lambda r, m: r["DC-DiT-S", "bf16"][rate] / r["DiT-S/2", "bf16"][rate], 0.90),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="judge the goals by wall time (default) or by this process's CPU time, which is steadier "
                             "on a shared machine (exact with --threads 1)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where each model's step goes, stage by stage, from the profiler")
    parser.add_argument("--json", action="store_true")
    cli = parser.parse_args(argv)
    settings = BenchSettings(models=("DiT-S/2", "DC-DiT-S"), image_size=cli.image_size, batch=cli.batch,
                             precision=("fp32", "bf16"), repeats=cli.repeats, warmup=cli.warmup, reference=True,
                             threads=cli.threads, profile=cli.profile)
    summary = run_benchmark(settings)
    rows = {(r["model"], r["precision"]): r for r in summary["results"]}
    machine = summary["machine_matmul_gflops" if cli.clock == "wall" else "machine_matmul_gflops_per_cpu_s"]
    goals = [{"goal": text, "value": round(value(rows, machine), 3), "target": target, "clock": cli.clock,
              "met": value(rows, machine) >= target} for text, value, target in _goals(cli.clock)]
    if cli.json:
        print(json.dumps({**summary, "goals": goals}, sort_keys=True))
        return 0
    print(format_table(summary))
    print()
    for g in goals:
        print(f"{'met ' if g['met'] else 'MISS'}  {g['goal']:<50} {g['value']:>6.2f}  (goal >= {g['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
