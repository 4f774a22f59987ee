"""Training-step speed on this machine: models, precisions and the machine's own matmul rate timed round-robin in
one process, so that load from other processes on a shared machine falls on all of them alike; each figure is the
median over the rounds. `dcdit bench` parses arguments into `BenchSettings` and prints `format_table`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from diffusers import DiTTransformer2DModel

from dcdit.config import preset
from dcdit.diffusion import create_diffusion
from dcdit.errors import DCDiTError
from dcdit.flops import calibrate_router, flop_counter
from dcdit.models import build_model, family_of
from dcdit.models.attention import attention_backend
from dcdit.objective import TrainingObjective, draw_samples
from dcdit_platform.perf.profile import format_profile, profile_step

PRECISIONS = ("fp32", "bf16")
REFERENCE_SUFFIX = " (diffusers)"


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """What one benchmark run times (the `dcdit bench` flags)."""

    models: tuple[str, ...]
    image_size: int = 256  # latents are 1/8 of it unless `pixel`
    pixel: bool = False
    batch: int = 8
    precision: tuple[str, ...] = ("fp32",)
    repeats: int = 5
    warmup: int = 2
    kept_fraction: float | None = None  # routed models: tokens kept (default 1/N)
    reference: bool = False  # also diffusers' DiTTransformer2DModel for each DiT
    attention_backend: str = "auto"
    threads: int | None = None
    seed: int = 0
    profile: bool = False  # also where each case's step goes, stage by stage (perf/profile.py)
    device: str = "cpu"  # benchmarks/gpu_check.py builds its cases on "cuda"

    def validate(self) -> None:
        if self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise DCDiTError("--batch and --repeats must be >= 1 and --warmup >= 0")


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel (the reference DiT implementation) behind the `model(x, t, y)` interface."""

    def __init__(self, config):
        super().__init__()
        self.inner = DiTTransformer2DModel(
            num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
            in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
            patch_size=config.patch_size, sample_size=config.input_size, num_embeds_ada_norm=config.num_classes,
            norm_type="ada_norm_zero", activation_fn="gelu-approximate")
        self.null_class = config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        # The objective draws class dropout itself; diffusers' label table has the null class at index num_classes.
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids == 1, self.null_class, y)
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
    forward_loss: Callable[[], torch.Tensor] | None = None  # the step's forward pass (for the profiler)
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)


def _autocast(precision: str, device_type: str = "cpu"):
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    # The paper's optimiser without weight decay; the fused kernel is the fastest AdamW on CPU as well. lr = 0: the
    # update does all of AdamW's arithmetic but leaves the weights, so a routed model's calibrated router keeps
    # the same tokens in every timed step (at lr 1e-4 one step moved a DC-DiT-S router from 25% to 60% kept).
    try:
        return torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)


def build_case(name: str, precision: str, args: BenchSettings, *, reference: bool = False) -> Case:
    overrides = dict(input_size=args.image_size, in_channels=3) if args.pixel else dict(
        input_size=args.image_size // 8)
    config = preset(name, **overrides)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = (DiffusersDiT(config) if reference else build_model(config)).to(device)
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, config.in_channels, config.input_size, config.input_size, generator=gen).to(device)
    y = torch.randint(0, config.num_classes, (args.batch,), generator=gen).to(device)
    routed = family_of(config).routed
    objective = TrainingObjective(create_diffusion(), routed=routed, downsample_factor=config.downsample_factor,
                                  class_dropout_prob=config.class_dropout_prob, seed=args.seed + 1)
    kept_fraction = None
    if routed:
        fraction = (1.0 / config.downsample_factor if args.kept_fraction is None else args.kept_fraction)
        # Calibrate on the very x_t, t and dropped labels the timed steps use (the objective's draws at step 0), so
        # the kept set is known.
        draws = draw_samples(x, seed=objective.seed, step=0, first=0, num_timesteps=1000,
                             class_dropout_prob=config.class_dropout_prob)
        xt = objective.diffusion.q_sample(x, draws.t, draws.noise)
        calibrate_router(model, xt, draws.t, torch.where(draws.drop, config.num_classes, y), fraction)
    optimizer = _adamw(model)

    def forward_loss() -> torch.Tensor:
        # Step 0 every time: the same t, noise and class dropout, so every timed step does identical work.
        with _autocast(precision, device.type):
            out = objective(model, x, y, step=0)
        step.routing = out.routing
        return out.loss

    def step() -> torch.Tensor:
        loss = forward_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    with flop_counter() as counter:
        step()
    flops = counter.get_total_flops()
    if routed:
        kept_fraction = float(step.routing.kept.double().mean()) / config.num_tokens
    with flop_counter() as counter, torch.no_grad():
        with _autocast(precision, device.type):
            objective(model, x, y, step=0)
    label = name + (REFERENCE_SUFFIX if reference else "")
    return Case(label, precision, model, step, sum(p.numel() for p in model.parameters()), flops,
                counter.get_total_flops(), kept_fraction, forward_loss=forward_loss, optimizer=optimizer)


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


def run_benchmark(args: BenchSettings) -> dict:
    """Build every case, time them round-robin with the machine's matmul rates, and summarise."""
    args.validate()
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
        # After the timed rounds, so every case is warm and the profiler's overhead stays out of the timings.
        profiles = [{"model": case.name, "precision": case.precision,
                     **profile_step(case.model, case.forward_loss, case.optimizer, warmup=0)}
                    for case in cases] if args.profile else []
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
        **({"profiles": profiles} if profiles else {}),
        "flops_note": "FLOPs per step measured with FlopCounterMode on the training step (forward + backward, "
                      "2 FLOPs per multiply-add; AdamW and elementwise work not counted)",
    }


def format_table(summary: dict) -> str:
    machine = summary["machine_matmul_gflops"]
    lines = [f"machine matmul: fp32 {machine['fp32']:.1f} GFLOPs/s, bf16 {machine['bf16']:.1f} GFLOPs/s "
             f"({summary['threads']} threads); batch {summary['batch']}, image {summary['image_size']}; "
             f"load average {summary['load_average'][0]} -> {summary['load_average'][1]}",
             f"{'model':<22} {'prec':<5} {'params':>8} {'GFLOPs/step':>11} {'step ms':>9} {'CPU ms':>9} "
             f"{'GFLOPs/s':>8} {'of matmul':>9} {'kept':>6}"]
    for r in summary["results"]:
        kept = f"{r['kept_fraction']:.3f}" if "kept_fraction" in r else ""
        lines.append(f"{r['model']:<22} {r['precision']:<5} {r['params'] / 1e6:>7.1f}M "
                     f"{r['flops_per_step'] / 1e9:>11.1f} {r['step_ms']:>9.1f} {r['step_cpu_ms']:>9.1f} "
                     f"{r['gflops_per_s']:>8.1f} {r['fraction_of_machine_matmul']:>9.0%} {kept:>6}")
    for p in summary.get("profiles", []):
        lines += ["", format_profile(f"{p['model']} {p['precision']}", p)]
    return "\n".join(lines)


__all__ = ["BenchSettings", "run_benchmark", "format_table", "matmul_rate", "PRECISIONS"]
