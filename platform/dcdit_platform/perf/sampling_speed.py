"""Sampling speed (`dcdit bench --mode sample`): full sampling of a batch for each model, guidance (CFG, Lite-CFG) and
tail drop rho, timed round-robin in one process; seconds and GFLOPs per image (measured and analytic), and the
wall-clock saving over the FLOP saving against a named baseline.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dcdit.config import preset
from dcdit.errors import DCDiTError
from dcdit.flops import calibrate_router
from dcdit.generate import LITE_CFG_UNCOND_DROP, SamplingPlan, generate
from dcdit.models import build_model, family_of
from dcdit.models.attention import attention_backend

GUIDANCES = ("cfg", "lite-cfg")
CFG_SCALE = 1.5  # any scale > 1 runs both branches; the scale itself costs nothing
LITE_CFG_SCALE = 1.25  # the paper's


@dataclass(frozen=True, kw_only=True)
class SampleBenchSettings:
    """What one sampling benchmark times (the `dcdit bench --mode sample` flags)."""

    models: tuple[str, ...]
    baseline: str | None = None  # default: the first model without a router, with CFG
    image_size: int = 256
    batch: int = 4
    steps: int = 2  # the ratios are per step, so a few steps measure them
    sampler: str = "ddim"
    guidance: tuple[str, ...] = GUIDANCES  # routed models; a DiT always runs CFG
    rhos: tuple[float, ...] = (0.0, 0.2, 0.4)  # routed models' tail drop
    kept_fraction: float | None = None  # routed models: tokens the calibrated router keeps (default 1/N)
    repeats: int = 3
    warmup: int = 1
    attention_backend: str = "auto"
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.batch < 1 or self.steps < 1 or self.repeats < 1 or self.warmup < 0:
            raise DCDiTError("--batch, --steps and --repeats must be >= 1 and --warmup >= 0")
        if self.sampler not in ("ddpm", "ddim"):
            raise DCDiTError(f"--sampler {self.sampler!r}: use ddpm or ddim")
        if self.image_size < 8 or self.image_size % 8:
            raise DCDiTError(f"--image-size {self.image_size} must be a positive multiple of 8 (the VAE factor)")
        for g in self.guidance:
            if g not in GUIDANCES:
                raise DCDiTError(f"--guidance {g!r}: use one or both of {', '.join(GUIDANCES)}")
        for rho in self.rhos:
            if not 0.0 <= rho < 1.0:
                raise DCDiTError(f"--rho {rho} must be in [0, 1)")
        if self.baseline is not None and self.baseline not in self.models:
            raise DCDiTError(f"--baseline {self.baseline} must be one of the models ({', '.join(self.models)})")


class _KeptRecorder(torch.nn.Module):
    """A DC-DiT that records the tokens each sample's backbone ran on (after tail drop), for the analytic count at
    the kept tokens the counted run actually had."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.kept = model, []

    def forward(self, x, t, y, **kwargs):
        out, routing = self.model(x, t, y, return_routing=True, **kwargs)
        self.kept.extend(routing.kept.tolist())
        return out


@dataclass
class SampleCase:
    """One timed configuration: a model with a guidance and tail drop."""

    model_name: str
    guidance: str
    rho: float | None
    run: object  # run(count) -> (FLOPs or None, tokens kept per sample and forward, or None)
    analytic_flops: float  # per image, 2 FLOPs per analytic MAC, every branch and step, at the nominal kept fraction
    analytic_at_kept: object = None  # kept tokens -> analytic FLOPs per image at them
    measured_flops: float = 0.0
    analytic_at_kept_flops: float | None = None
    kept_fraction: float | None = None  # mean over the counted run's forwards and samples
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # this process's CPU seconds per image

    @property
    def label(self) -> str:
        rho = "" if self.rho is None else f", rho {self.rho:g}"
        return f"{self.model_name} {self.guidance}{rho}"


def _analytic_flops(config, guidance: str, rho: float | None, kept_fraction: float | None, steps: int) -> float:
    """2 x analytic MACs of both guidance branches x steps, for one image (the FLOP counter's convention)."""
    family = family_of(config)
    if not family.routed:
        return 2.0 * 2 * family.forward_macs(config).total * steps
    fraction = 1.0 / config.downsample_factor if kept_fraction is None else kept_fraction
    rho = rho or 0.0
    uncond_rho = max(LITE_CFG_UNCOND_DROP, rho) if guidance == "lite-cfg" else rho
    cond = family.forward_macs(config, fraction * (1 - rho)).total
    uncond = family.forward_macs(config, fraction * (1 - uncond_rho)).total
    return 2.0 * (cond + uncond) * steps


def _cases_for(name: str, args: SampleBenchSettings) -> list[SampleCase]:
    config = preset(name, input_size=args.image_size // 8)
    torch.manual_seed(args.seed)
    model = build_model(config).eval()
    routed = family_of(config).routed
    shape = (config.in_channels, config.input_size, config.input_size)
    if routed:
        # Calibrate the untrained router on what sampling feeds it: noise, the sampler's timesteps, real and null
        # labels; a uniform logit shift keeps its ranking (dcdit.flops.calibrate_router).
        gen = torch.Generator().manual_seed(args.seed)
        n = 2 * args.batch
        x = torch.randn(n, *shape, generator=gen)
        t = torch.linspace(0, 999, n).round().long()
        y = torch.cat([torch.randint(0, config.num_classes, (args.batch,), generator=gen),
                       torch.full((args.batch,), config.num_classes)])
        fraction = 1.0 / config.downsample_factor if args.kept_fraction is None else args.kept_fraction
        calibrate_router(model, x, t, y, fraction)
    settings = [(g, rho) for g in args.guidance for rho in args.rhos] if routed else [("cfg", None)]
    cases = []
    for guidance, rho in settings:
        plan = SamplingPlan(sampler=args.sampler, steps=args.steps, num_timesteps=1000,
                            learn_sigma=config.learn_sigma,
                            cfg_scale=LITE_CFG_SCALE if guidance == "lite-cfg" else CFG_SCALE,
                            lite_cfg=guidance == "lite-cfg", rho=rho, null_class=config.num_classes, seed=args.seed,
                            num_classes=config.num_classes)

        def run(count: bool = False, plan=plan):
            recorder = _KeptRecorder(model) if count and routed else None
            flops = generate(recorder or model, plan, np.arange(args.batch), shape, device=torch.device("cpu"),
                             count_flops=count)[1]
            return flops, (recorder.kept if recorder is not None else None)

        def at_kept(kept: list[int]) -> float:
            # forward_macs averages over the sample-forwards; there are len(kept) of them for `batch` images.
            return 2.0 * family_of(config).forward_macs(config, kept_tokens=kept).total * len(kept) / args.batch

        cases.append(SampleCase(name, guidance, rho, run,
                                _analytic_flops(config, guidance, rho, args.kept_fraction, args.steps),
                                at_kept if routed else None))
    return cases


def run_sample_benchmark(args: SampleBenchSettings) -> dict:
    """Build every case, count its FLOPs once, time them round-robin, and compare each with the baseline."""
    args.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with attention_backend(args.attention_backend):
        cases = [case for name in args.models for case in _cases_for(name, args)]
        baseline = _baseline(cases, args)
        for case in cases:
            flops, kept = case.run(count=True)
            case.measured_flops = flops / args.batch
            if kept is not None:
                case.analytic_at_kept_flops = case.analytic_at_kept(kept)
                case.kept_fraction = sum(kept) / len(kept) / (args.image_size // 8) ** 2
        for round_index in range(args.warmup + args.repeats):
            for case in cases:
                start, cpu = time.perf_counter(), time.process_time()
                case.run(False)
                if round_index >= args.warmup:
                    case.times.append((time.perf_counter() - start) / args.batch)
                    case.cpu_times.append((time.process_time() - cpu) / args.batch)
    base_time = statistics.median(baseline.times)
    results = []
    for case in cases:
        seconds = statistics.median(case.times)
        time_ratio, flop_ratio = seconds / base_time, case.measured_flops / baseline.measured_flops
        flop_saving = 1 - flop_ratio
        results.append({
            "case": case.label, "model": case.model_name, "guidance": case.guidance, "rho": case.rho,
            "seconds_per_image": round(seconds, 6), "images_per_s": round(1 / seconds, 4),
            # Per CPU-second of this process: steadier than wall time on a shared machine (exact with one thread).
            "cpu_seconds_per_image": round(statistics.median(case.cpu_times), 6),
            "gflops_per_image_measured": round(case.measured_flops / 1e9, 3),
            "gflops_per_image_analytic": round(case.analytic_flops / 1e9, 3),
            **({"gflops_per_image_analytic_at_kept": round(case.analytic_at_kept_flops / 1e9, 3),
                "kept_fraction": round(case.kept_fraction, 4)} if case.kept_fraction is not None else {}),
            "time_ratio": round(time_ratio, 5), "flop_ratio": round(flop_ratio, 5),
            # Seconds per FLOP against the baseline's: defined for costlier cases too (1 = FLOPs became time).
            "time_per_flop_ratio": round(time_ratio / flop_ratio, 4),
            # None where there is no FLOP saving to measure against (the baseline itself, or a costlier case).
            "wall_saving_over_flop_saving": round((1 - time_ratio) / flop_saving, 4) if flop_saving > 1e-6 else None,
        })
    return {"results": results, "baseline": baseline.label, "image_size": args.image_size, "batch": args.batch,
            "steps": args.steps, "sampler": args.sampler, "repeats": args.repeats, "warmup": args.warmup,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "flops_note": "measured: FlopCounterMode over the whole sampling call (2 FLOPs per MAC, both guidance "
                          "branches, every step); analytic: 2 x dcdit.flops MACs at the nominal kept fraction "
                          "x (1 - rho), Lite-CFG's unconditional branch at rho 0.9; per image and for all steps"}


def _baseline(cases: list[SampleCase], args: SampleBenchSettings) -> SampleCase:
    if args.baseline is not None:
        return next(c for c in cases if c.model_name == args.baseline)
    unrouted = [c for c in cases if c.rho is None]
    return unrouted[0] if unrouted else cases[0]


def format_sample_table(summary: dict) -> str:
    lines = [(f"sampling: {summary['sampler']} {summary['steps']} steps, batch {summary['batch']}, image "
              f"{summary['image_size']}, {summary['threads']} threads; baseline {summary['baseline']}; load average "
              f"{summary['load_average'][0]} -> {summary['load_average'][1]}"),
             (f"{'case':<28} {'s/image':>8} {'img/s':>7} {'GFLOPs/img':>10} {'analytic':>9} {'at kept':>8} {'time x':>7} "
              f"{'FLOPs x':>7} {'s/FLOP x':>8} {'wall/FLOP saving':>16} {'kept':>6}")]
    for r in summary["results"]:
        saving = r["wall_saving_over_flop_saving"]
        kept = f"{r['kept_fraction']:.3f}" if "kept_fraction" in r else ""
        at_kept = f"{r['gflops_per_image_analytic_at_kept']:.1f}" if "kept_fraction" in r else ""
        ratio = ("" if r["flop_ratio"] == 1 else "n/a: costs more") if saving is None else f"{saving:.2f}"
        lines.append(f"{r['case']:<28} {r['seconds_per_image']:>8.3f} {r['images_per_s']:>7.2f} "
                     f"{r['gflops_per_image_measured']:>10.1f} {r['gflops_per_image_analytic']:>9.1f} {at_kept:>8} "
                     f"{r['time_ratio']:>7.3f} {r['flop_ratio']:>7.3f} {r['time_per_flop_ratio']:>8.3f} {ratio:>16} {kept:>6}")
    return "\n".join(lines)


__all__ = ["GUIDANCES", "SampleBenchSettings", "format_sample_table", "run_sample_benchmark"]
