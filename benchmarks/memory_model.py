"""The memory model (dcdit_platform/perf/memory.py) against measured training steps of small DiT and DC-DiT
configurations on this CPU: the bytes autograd saved for backward and the running peak of the step's allocations
(torch.profiler), next to the model's activations; then the model's table for DiT-XL/2 and DC-DiT-XL.

    .venv/bin/python benchmarks/memory_model.py [--batch 4] [--depth 2] [--width 128] [--heads 4] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from dcdit.config import preset
from dcdit_platform.perf.memory import MemoryQuery, format_memory_table, memory_table, training_memory
from dcdit_platform.perf.memory_measure import measure_step

GRIDS = (8, 16, 32)  # latent sides: 64, 128 and 256 px


def check(cli: argparse.Namespace) -> list[dict]:
    rows = []
    for name in ("DiT-S/2", "DC-DiT-S"):
        for grid in GRIDS:
            config = preset(name, input_size=grid, depth=cli.depth, hidden_size=cli.width, num_heads=cli.heads)
            for precision in ("fp32", "bf16"):
                measured = measure_step(config, cli.batch, precision, peak=True)
                model = training_memory(config, cli.batch, precision, device="cpu",
                                        kept_fraction=measured.kept_fraction)
                rows.append({"model": name, "grid": grid, "precision": precision, "saved": measured.saved,
                             "model_activations": model.activation_total, "peak": measured.peak,
                             "model_over_saved": round(model.activation_total / measured.saved, 4),
                             "peak_over_saved": round(measured.peak / measured.saved, 4),
                             "kept_fraction": measured.kept_fraction})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    cli = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = check(cli)
    table = memory_table(MemoryQuery(models=("DiT-XL/2", "DC-DiT-XL"), image_sizes=(256, 512)))
    if cli.json:
        print(json.dumps({"checks": rows, "table": table}, sort_keys=True))
        return 0
    print(f"small configurations: depth {cli.depth}, width {cli.width}, {cli.heads} heads, batch {cli.batch}")
    print(f"{'model':<9} {'grid':>4} {'prec':<5} {'saved MiB':>9} {'model MiB':>9} {'model/saved':>11} "
          f"{'peak MiB':>8} {'peak/saved':>10}")
    for r in rows:
        print(f"{r['model']:<9} {r['grid']:>4} {r['precision']:<5} {r['saved'] / 2**20:>9.2f} "
              f"{r['model_activations'] / 2**20:>9.2f} {r['model_over_saved']:>11.3f} {r['peak'] / 2**20:>8.2f} "
              f"{r['peak_over_saved']:>10.3f}")
    print()
    print(format_memory_table(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
