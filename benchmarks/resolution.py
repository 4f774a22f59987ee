"""Growth with resolution (issue 14, item 3): DiT-S/2 and DC-DiT-S at 256 and 512 px (latent grids 32 and 64) side by
side in one run: training step time, sampling time per image, activation memory (the analytic model beside the
bytes a measured step saved), and the 512/256 ratio of each next to the ratio of backbone tokens and of FLOPs.

    nice .venv/bin/python benchmarks/resolution.py [--batch 2] [--sample-batch 2] [--steps 2] [--repeats 3]
                                                   [--warmup 1] [--threads 1] [--sizes 256 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import os

from dcdit.config import preset
from dcdit_platform.perf.memory import training_memory
from dcdit_platform.perf.memory_measure import measure_step
from dcdit_platform.perf.sampling_speed import SampleBenchSettings, run_sample_benchmark
from dcdit_platform.perf.speed import BenchSettings, run_benchmark

MODELS = ("DiT-S/2", "DC-DiT-S")
SIZES = (256, 512)
GIB = 2.0 ** 30


def measure(cli: argparse.Namespace) -> list[dict]:
    """One row per (model, size): the timings of both benchmarks and the memory of a step at --batch."""
    rows = []
    for size in cli.sizes:
        train = run_benchmark(BenchSettings(models=MODELS, image_size=size, batch=cli.batch, precision=("fp32",),
                                            repeats=cli.repeats, warmup=cli.warmup, threads=cli.threads))
        sample = run_sample_benchmark(SampleBenchSettings(
            models=MODELS, image_size=size, batch=cli.sample_batch, steps=cli.steps, guidance=("cfg",), rhos=(0.0,),
            repeats=cli.repeats, warmup=cli.warmup, threads=cli.threads))
        samples = {r["model"]: r for r in sample["results"]}
        for t in train["results"]:
            config = preset(t["model"], input_size=size // 8)
            kept = t.get("kept_fraction")
            measured = measure_step(config, cli.batch, "fp32", kept_fraction=kept)
            model = training_memory(config, cli.batch, "fp32", device="cpu", kept_fraction=kept)
            s = samples[t["model"]]
            rows.append({"model": t["model"], "image_size": size,
                         "backbone_tokens": round(config.num_tokens * (kept or 1.0)),
                         "gflops_per_step": t["flops_per_step"] / 1e9, "step_s": t["step_ms"] / 1e3,
                         "step_cpu_s": t["step_cpu_ms"] / 1e3, "sample_s_per_image": s["seconds_per_image"],
                         "sample_cpu_s_per_image": s["cpu_seconds_per_image"],
                         "sample_gflops_per_image": s["gflops_per_image_measured"],
                         "activations_model_gib": model.activation_total / GIB,
                         "activations_measured_gib": measured.saved / GIB, "total_model_gib": model.total / GIB,
                         "parts_model_gib": {k: v / GIB for k, v in model.activations.items()},
                         "load_average": [train["load_average"][0], sample["load_average"][1]]})
    return rows


RATIO_KEYS = ("backbone_tokens", "gflops_per_step", "step_s", "step_cpu_s", "sample_gflops_per_image",
              "sample_s_per_image", "sample_cpu_s_per_image", "activations_model_gib", "activations_measured_gib")


def ratios(rows: list[dict], sizes: tuple[int, int]) -> list[dict]:
    """The larger size over the smaller, per model."""
    by = {(r["model"], r["image_size"]): r for r in rows}
    return [{"model": m, **{k: round(by[m, sizes[1]][k] / by[m, sizes[0]][k], 3) for k in RATIO_KEYS}}
            for m in MODELS]


def format_report(rows: list[dict], growth: list[dict], cli: argparse.Namespace) -> str:
    lines = [f"training: batch {cli.batch}, fp32; sampling: DDIM {cli.steps} steps, CFG, batch {cli.sample_batch}; "
             f"{cli.threads} thread(s); median of {cli.repeats} after {cli.warmup} warm-up",
             f"{'model':<9} {'px':>4} {'tokens':>6} {'GFLOP/step':>10} {'step s':>7} {'CPU s':>7} {'sample s/img':>12} "
             f"{'CPU s/img':>9} {'act. GiB model':>14} {'measured':>8} {'total GiB':>9} {'load':>11}"]
    for r in rows:
        lines.append(f"{r['model']:<9} {r['image_size']:>4} {r['backbone_tokens']:>6} {r['gflops_per_step']:>10.1f} "
                     f"{r['step_s']:>7.2f} {r['step_cpu_s']:>7.2f} {r['sample_s_per_image']:>12.3f} "
                     f"{r['sample_cpu_s_per_image']:>9.3f} {r['activations_model_gib']:>14.3f} "
                     f"{r['activations_measured_gib']:>8.3f} {r['total_model_gib']:>9.3f} "
                     f"{r['load_average'][0]:>5.1f}-{r['load_average'][1]:<5.1f}")
    lines += ["", f"{cli.sizes[1]} px / {cli.sizes[0]} px:", f"{'model':<9} " + " ".join(f"{k[:14]:>14}" for k in RATIO_KEYS)]
    for g in growth:
        lines.append(f"{g['model']:<9} " + " ".join(f"{g[k]:>14.2f}" for k in RATIO_KEYS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="training samples per step (default 2)")
    parser.add_argument("--sample-batch", type=int, default=2, help="images per sampling call (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the steadier clock)")
    parser.add_argument("--sizes", type=int, nargs=2, default=list(SIZES), help="the two image sides (default 256 512)")
    parser.add_argument("--json", action="store_true")
    cli = parser.parse_args(argv)
    load = os.getloadavg()[0]
    rows = measure(cli)
    growth = ratios(rows, tuple(cli.sizes))
    if cli.json:
        print(json.dumps({"rows": rows, "ratios": growth, "load_average_start": load}, sort_keys=True))
    else:
        print(format_report(rows, growth, cli))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
