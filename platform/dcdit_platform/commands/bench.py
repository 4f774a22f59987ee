"""`dcdit bench`: time training steps (forward, backward, AdamW) of models on this machine, with their FLOP rates.

Models, precisions and the machine's own matmul rate are timed round-robin in one process, so that load from
other processes on a shared machine falls on all of them alike; each figure is the median over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from dcdit_platform.console import print_json

PRECISIONS = ("fp32", "bf16")
REFERENCE_SUFFIX = " (diffusers)"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time training steps (forward+backward+AdamW) and report FLOP rates",
        description="Times the training step of each MODEL (the diffusion objective with the ratio loss for DC-DiT, "
                    "then AdamW) on random latents, after warm-up, as the median of repeats. FLOPs per step are "
                    "measured with torch's FlopCounterMode on the step itself. DC-DiT's untrained router is "
                    "calibrated to keep --kept-fraction of the tokens (default 1/N) so that its backbone does the "
                    "work a trained model's would. The machine's matmul rate is measured in the same run.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="preset names, e.g. DiT-S/2 DC-DiT-S")
    p.add_argument("--image-size", type=int, default=256, help="image side; latents are 1/8 of it (default 256)")
    p.add_argument("--pixel", action="store_true", help="pixel-space models: the grid is the image, 3 channels")
    p.add_argument("--batch", type=int, default=8, help="samples per step (default 8)")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                   help="fp32 and/or bf16 (autocast; router and de-chunk stay fp32); several are timed side by side")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--kept-fraction", type=float, default=None, help="DC-DiT tokens kept (default 1/N)")
    p.add_argument("--reference", action="store_true",
                   help="also time diffusers' DiTTransformer2DModel with each DiT model's config")
    p.add_argument("--attention-backend", default="auto", help="packed attention backend (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=bench)


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel (the reference DiT implementation) behind the `model(x, t, y)` interface."""

    def __init__(self, config):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.inner = DiTTransformer2DModel(
            num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
            in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
            patch_size=config.patch_size, sample_size=config.input_size, num_embeds_ada_norm=config.num_classes,
            norm_type="ada_norm_zero", activation_fn="gelu-approximate")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner(x, timestep=t, class_labels=y).sample


@dataclass
class Case:
    """One timed configuration: a model at a precision, with its optimiser and fixed batch."""

    name: str
    precision: str
    model: nn.Module
    step: Callable[[], torch.Tensor]
    params: int
    flops_per_step: float = 0.0
    forward_flops: float = 0.0
    kept_fraction: float | None = None
    times: list[float] | None = None
    cpu_times: list[float] | None = None


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    # The paper's optimiser (lr 1e-4, no weight decay); the fused kernel is the fastest AdamW on CPU as well.
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)


def build_case(name: str, precision: str, args: argparse.Namespace, *, reference: bool = False) -> Case:
    from dcdit.config import preset
    from dcdit.diffusion import create_diffusion
    from dcdit.flops import calibrate_router, flop_counter
    from dcdit.models import build_model
    from dcdit.objective import TrainingObjective

    overrides = dict(input_size=args.image_size, in_channels=3) if args.pixel else dict(
        input_size=args.image_size // 8)
    config = preset(name, **overrides)
    torch.manual_seed(args.seed)
    model = DiffusersDiT(config) if reference else build_model(config)
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    y = torch.randint(0, config.num_classes, (args.batch,), generator=gen)
    objective = TrainingObjective(create_diffusion(), is_dcdit=config.arch == "dcdit",
                                  downsample_factor=config.downsample_factor)
    kept_fraction = None
    if config.arch == "dcdit":
        fraction = (1.0 / config.downsample_factor if args.kept_fraction is None else args.kept_fraction)
        # Calibrate on the very x_t and t the timed steps use (same seed below), so the kept set is known.
        torch.manual_seed(args.seed + 1)
        t = torch.randint(0, 1000, (args.batch,))
        xt = objective.diffusion.q_sample(x, t, torch.randn_like(x))
        calibrate_router(model, xt, t, y, fraction)
    optimizer = _adamw(model)

    def step() -> torch.Tensor:
        torch.manual_seed(args.seed + 1)  # the same t, noise and class dropout every step: identical work
        with _autocast(precision):
            out = objective(model, x, y, step=0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        step.routing = out.routing
        return out.loss

    with flop_counter() as counter:
        step()
    flops = counter.get_total_flops()
    if config.arch == "dcdit":
        kept_fraction = float(step.routing.kept.double().mean()) / config.num_tokens
    with flop_counter() as counter, torch.no_grad():
        torch.manual_seed(args.seed + 1)
        with _autocast(precision):
            objective(model, x, y, step=0)
    label = name + (REFERENCE_SUFFIX if reference else "")
    return Case(label, precision, model, step, sum(p.numel() for p in model.parameters()), flops,
                counter.get_total_flops(), kept_fraction, [], [])


def matmul_rate(dtype: torch.dtype, size: int = 2048, calls: int = 4) -> tuple[float, float]:
    """GFLOP/s of square matmuls of `size` in `dtype`, per wall-clock second and per CPU second of this process."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        a @ b
    flops = 2 * size**3 * calls / 1e9
    return flops / (time.perf_counter() - wall), flops / (time.process_time() - cpu)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Build every case, time them round-robin with the machine's matmul rates, and summarise."""
    from dcdit.models.attention import attention_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = []
    load_before = os.getloadavg()[0]
    with attention_backend(args.attention_backend):
        for precision in args.precision:
            for name in args.models:
                cases.append(build_case(name, precision, args))
                if args.reference and cases[-1].model.__class__.__name__ == "DiT":
                    cases.append(build_case(name, precision, args, reference=True))
        rates: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        cpu_rates: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        for round_index in range(args.warmup + args.repeats):
            timed = round_index >= args.warmup
            for precision in PRECISIONS:
                rate, cpu_rate = matmul_rate(dtypes[precision])
                if timed:
                    rates[precision].append(rate)
                    cpu_rates[precision].append(cpu_rate)
            for case in cases:
                wall, cpu = time.perf_counter(), time.process_time()
                case.step()
                if timed:
                    case.times.append(time.perf_counter() - wall)
                    case.cpu_times.append(time.process_time() - cpu)
    machine = {p: statistics.median(r) for p, r in rates.items()}
    machine_cpu = {p: statistics.median(r) for p, r in cpu_rates.items()}
    results = []
    for case in cases:
        step_s = statistics.median(case.times)
        rate = case.flops_per_step / step_s / 1e9
        cpu_rate = case.flops_per_step / statistics.median(case.cpu_times) / 1e9
        results.append({
            "model": case.name, "precision": case.precision, "params": case.params, "batch": args.batch,
            "flops_per_step": case.flops_per_step, "forward_flops": case.forward_flops,
            "step_ms": round(step_s * 1e3, 2), "step_ms_min": round(min(case.times) * 1e3, 2),
            "gflops_per_s": round(rate, 2),
            "fraction_of_machine_matmul": round(rate / machine[case.precision], 3),
            # Per CPU-second of this process: steadier than wall time when other processes share the cores
            # (exact with --threads 1; with more threads it also counts OpenMP spin-waiting).
            "step_cpu_ms": round(statistics.median(case.cpu_times) * 1e3, 2),
            "gflops_per_cpu_s": round(cpu_rate, 2),
            "fraction_of_machine_matmul_cpu": round(cpu_rate / machine_cpu[case.precision], 3),
            **({"kept_fraction": round(case.kept_fraction, 4)} if case.kept_fraction is not None else {}),
        })
    return {
        "results": results,
        "machine_matmul_gflops": {p: round(r, 1) for p, r in machine.items()},
        "machine_matmul_gflops_per_cpu_s": {p: round(r, 1) for p, r in machine_cpu.items()},
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "image_size": args.image_size, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
        platform.machine(), "attention_backend": args.attention_backend,
        "flops_note": "FLOPs per step measured with FlopCounterMode on the training step (forward + backward, "
                      "2 FLOPs per multiply-add; AdamW and elementwise work not counted)",
    }


def bench(args: argparse.Namespace) -> int:
    from dcdit.errors import DCDiTError

    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise DCDiTError("--batch and --repeats must be >= 1 and --warmup >= 0")
    summary = run_benchmark(args)
    if args.json:
        print_json(summary)
        return 0
    print(format_table(summary))
    return 0


def format_table(summary: dict) -> str:
    machine = summary["machine_matmul_gflops"]
    lines = [f"machine matmul: fp32 {machine['fp32']:.1f} GFLOP/s, bf16 {machine['bf16']:.1f} GFLOP/s "
             f"({summary['threads']} threads); batch {summary['batch']}, image {summary['image_size']}; "
             f"load average {summary['load_average'][0]} -> {summary['load_average'][1]}",
             f"{'model':<22} {'prec':<5} {'params':>8} {'GFLOP/step':>11} {'step ms':>9} {'GFLOP/s':>8} "
             f"{'of matmul':>9} {'kept':>6}"]
    for r in summary["results"]:
        kept = f"{r['kept_fraction']:.3f}" if "kept_fraction" in r else ""
        lines.append(f"{r['model']:<22} {r['precision']:<5} {r['params'] / 1e6:>7.1f}M "
                     f"{r['flops_per_step'] / 1e9:>11.1f} {r['step_ms']:>9.1f} {r['gflops_per_s']:>8.1f} "
                     f"{r['fraction_of_machine_matmul']:>9.0%} {kept:>6}")
    return "\n".join(lines)
