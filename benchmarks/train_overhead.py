"""Overhead of the training platform, measured in one run:

    .venv/bin/python benchmarks/train_overhead.py [--steps 50] [--batch 16] [--hidden 128] [--depth 4]

1. A plain single-process PyTorch loop: the same DC-DiT (synthetic 32x32 RGB), objective, reader, AdamW, grad clip
   and EMA as `dcdit train`, nothing else (no Ray, no DDP, no MLflow, no checkpoints), one CPU thread.
2. `dcdit train` of the same run with 1 Ray worker (1 CPU): MLflow logging every 10 steps, checkpoints every 25,
   no sample artifacts. Ray start-up (`ray.init`) and the worker group's start are reported separately from the
   training loop, which the goal (<= 1.15x the plain loop) is about.
3. The same run with 2 workers (DDP over gloo, 1 CPU each, same global batch): throughput versus 1 worker.

The plain loop runs before and after the Ray runs (the faster counts), and CPU times are printed next to wall
times: on a machine shared with other jobs the wall-time ratios move with the load, CPU time much less.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import ray
import torch

from dcdit.data import DataReader, SyntheticDataset
from dcdit.diffusion import create_diffusion
from dcdit.models import build_model, family_of
from dcdit.objective import TrainingObjective
from dcdit_platform.config import build_config
from dcdit_platform.training import plan_run, run_training


def experiment(args, workers: int, storage: str) -> dict:
    side = args.size
    return {
        "seed": 0,
        "model": {"arch": "dcdit", "depth": args.depth, "hidden_size": args.hidden, "num_heads": 4,
                  "input_size": side, "in_channels": 3, "num_classes": 10, "scaffold_width": args.hidden // 4,
                  "downsample_factor": 4},
        "data": {"source": "synthetic", "image_size": side, "num_classes": 10, "num_samples": 4096},
        "train": {"steps": args.steps, "global_batch": args.batch, "lr": 1e-4, "ema_decay": 0.999,
                  "chunking": {"ratio_group_size": 8}},
        "checkpoint": {"every": 25, "keep": 2},
        "logging": {"every": 10, "artifacts_every": -1},
        "resources": {"num_workers": workers, "cpus_per_worker": 1},
        "storage": {"uri": storage},
    }


def plain_loop(config) -> dict:
    """The reference loop: what a researcher would write by hand for one process."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=0.0)
    objective = TrainingObjective(create_diffusion(), routed=family_of(config.model).routed, downsample_factor=4.0,
                                  class_dropout_prob=config.model.class_dropout_prob, chunking=config.train.chunking,
                                  seed=config.seed)
    d = config.data
    reader = DataReader(SyntheticDataset(d.num_samples, image_size=d.image_size, num_classes=d.num_classes),
                        batch_size=config.train.global_batch, seed=config.seed)
    setup = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    for step in range(1, config.train.steps + 1):
        batch = next(reader)
        optimizer.zero_grad(set_to_none=True)
        out = objective(model, batch.x, batch.y, step)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - config.train.ema_decay)
    loop, cpu = time.perf_counter() - t1, time.process_time() - c1
    reader.close()
    return {"setup_s": setup, "loop_s": loop, "cpu_s": cpu}


def platform_run(config, name: str) -> dict:
    t0 = time.perf_counter()
    summary = run_training(plan_run(config, name=name), echo=lambda _: None)
    fit = time.perf_counter() - t0
    m = summary["metrics"]
    return {"fit_s": fit, "loop_s": m["time/loop_s"], "cpu_s": m["time/loop_cpu_s"],
            "worker_setup_s": m["time/worker_setup_s"],
            "images_per_s": config.train.steps * config.train.global_batch / m["time/loop_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    with tempfile.TemporaryDirectory(prefix="dcdit-bench-") as tmp:
        one = build_config(experiment(args, 1, tmp))
        two = build_config(experiment(args, 2, tmp))
        before = plain_loop(one)

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, logging_level="warning", log_to_driver=False)
        ray_init = time.perf_counter() - t0
        try:
            w1 = platform_run(one, "bench-1w")
            w2 = platform_run(two, "bench-2w")
        finally:
            ray.shutdown()
        after = plain_loop(one)  # the machine's load drifts: the plain loop brackets the Ray runs
        plain = min(before, after, key=lambda r: r["loop_s"])

    plain_ips = args.steps * args.batch / plain["loop_s"]
    rows = [
        ("plain loop before / after the Ray runs", f"{before['loop_s']:.1f} s / {after['loop_s']:.1f} s",
         f"{plain_ips:.1f} img/s (faster one)"),
        ("plain loop CPU time", f"{plain['cpu_s']:.1f} s", ""),
        ("ray.init (embedded cluster)", f"{ray_init:.1f} s", ""),
        ("dcdit train 1 worker: fit wall", f"{w1['fit_s']:.1f} s", ""),
        ("  worker group start + teardown", f"{w1['fit_s'] - w1['loop_s'] - w1['worker_setup_s']:.1f} s", ""),
        ("  worker setup (model, data, MLflow)", f"{w1['worker_setup_s']:.1f} s", ""),
        ("  training loop", f"{w1['loop_s']:.1f} s", f"{w1['images_per_s']:.1f} img/s"),
        ("  training loop CPU time (rank 0)", f"{w1['cpu_s']:.1f} s", ""),
        ("dcdit train 2 workers: training loop", f"{w2['loop_s']:.1f} s", f"{w2['images_per_s']:.1f} img/s"),
    ]
    ratios = [
        ("loop wall: dcdit train 1 worker / plain (goal <= 1.15)", w1["loop_s"] / plain["loop_s"]),
        ("loop CPU time: dcdit train 1 worker / plain", w1["cpu_s"] / plain["cpu_s"]),
        ("end to end without ray.init: fit / (plain setup + loop)", w1["fit_s"] / (plain["setup_s"] + plain["loop_s"])),
        ("throughput: 2 workers / 1 worker", w2["images_per_s"] / w1["images_per_s"]),
        ("throughput: 2 workers / plain loop", w2["images_per_s"] / plain_ips),
    ]
    print(f"\nDC-DiT depth {args.depth} width {args.hidden}, {args.size}x{args.size} synthetic, global batch "
          f"{args.batch}, {args.steps} steps, 1 CPU thread per process, {os.cpu_count()} CPUs "
          f"(load average at the end: {os.getloadavg()[0]:.1f})")
    width = max(len(r[0]) for r in rows + ratios) + 2
    for label, value, extra in rows:
        print(f"{label:<{width}}{value:>18}  {extra}")
    print()
    for label, value in ratios:
        print(f"{label:<{width}}{value:>18.2f}x")


if __name__ == "__main__":
    main()
