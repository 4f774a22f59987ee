"""Named training statistics: the float64 sums one optimizer step records (`StepStats`, one tensor so that one
all-reduce sums them over the ranks), the window that turns the sums of several steps into the logged metrics
(`MetricWindow`, metric names as MLflow shows them), the FLOP model behind perf/gflops_per_s and the loop clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dcdit.models import family_of
from dcdit.objective import StepLoss
from dcdit_platform.config import ExperimentConfig

TIMESTEP_BUCKETS = 5  # kept fraction is logged per fifth of the diffusion time range

# The named sums, in their order in the packed tensor; then the kept fraction summed per timestep bucket and the
# number of samples per bucket (TIMESTEP_BUCKETS each).
SUMS = (
    "loss",  # total loss (diffusion + lambda * ratio [+ distillation]) x samples
    "diffusion_loss",  # x samples
    "ratio_loss",  # x samples (routed models)
    "distill_loss",  # x samples (upcycling warm-up)
    "samples",
    "kept_tokens",  # tokens the backbone ran on (after tail dropping)
    "router_kept_tokens",  # tokens the router chose (before tail dropping)
    "grid_tokens",  # tokens of the full grid, per sample summed
    "kept_tokens_sq",  # sum of squared kept counts per sample: the attention term of the FLOP model
    "nonfinite",  # micro-batches whose loss was NaN or infinite
)
_INDEX = {name: i for i, name in enumerate(SUMS)}
_BUCKET_KEPT = slice(len(SUMS), len(SUMS) + TIMESTEP_BUCKETS)
_BUCKET_COUNT = slice(len(SUMS) + TIMESTEP_BUCKETS, len(SUMS) + 2 * TIMESTEP_BUCKETS)
_SIZE = len(SUMS) + 2 * TIMESTEP_BUCKETS


class StepStats:
    """Named float64 sums over micro-batches (and, after `all_reduce`, over ranks), held in one tensor."""

    def __init__(self, tensor: torch.Tensor | None = None, *, device: torch.device | None = None):
        self.tensor = torch.zeros(_SIZE, dtype=torch.float64, device=device) if tensor is None else tensor

    def __getitem__(self, name: str) -> float:
        return float(self.tensor[_INDEX[name]])

    def add(self, name: str, value) -> None:
        self.tensor[_INDEX[name]] += value

    def record(self, out: StepLoss, loss: torch.Tensor, distill: torch.Tensor | None, num_timesteps: int) -> None:
        """Add one micro-batch: its losses weighted by its size, and for routed models its token counts and its
        kept fraction per timestep bucket. `loss` is what was backpropagated (with the distillation term)."""
        n = out.timesteps.shape[0]
        d = loss.detach().double()
        self.add("loss", d * n)
        self.add("diffusion_loss", out.diffusion_loss.detach().double() * n)
        if out.ratio_loss is not None:
            self.add("ratio_loss", out.ratio_loss.detach().double() * n)
        if distill is not None:
            self.add("distill_loss", distill.detach().double() * n)
        self.add("samples", n)
        self.add("nonfinite", (~torch.isfinite(d)).double())
        routing = out.routing
        if routing is None:
            return
        kept = routing.kept.double()
        grid = routing.mask.shape[1]
        self.add("kept_tokens", kept.sum())
        self.add("router_kept_tokens", routing.router_mask.sum().double())
        self.add("grid_tokens", grid * n)
        self.add("kept_tokens_sq", kept.square().sum())
        bucket = (out.timesteps.long() * TIMESTEP_BUCKETS // num_timesteps).clamp(0, TIMESTEP_BUCKETS - 1)
        self.tensor[_BUCKET_KEPT].index_add_(0, bucket, kept / grid)
        self.tensor[_BUCKET_COUNT].index_add_(0, bucket, torch.ones_like(kept))

    def bucket_kept(self, bucket: int) -> float:
        """Sum of the kept fractions of the samples whose timestep fell in `bucket`."""
        return float(self.tensor[_BUCKET_KEPT][bucket])

    def bucket_count(self, bucket: int) -> float:
        return float(self.tensor[_BUCKET_COUNT][bucket])

    def all_reduce(self) -> None:
        """Sum over the ranks of the process group: one collective for every statistic."""
        dist.all_reduce(self.tensor)

    def cpu(self) -> StepStats:
        return StepStats(self.tensor.cpu())

    def __iadd__(self, other: StepStats) -> StepStats:
        self.tensor += other.tensor
        return self


@dataclass
class StepResult:
    """One optimizer step as the loop sees it: the global batch's sums and whether the step was taken."""

    stats: StepStats  # on CPU, summed over the global batch
    grad_norm: float
    finite: bool  # False: a non-finite loss or gradient norm, and no optimizer step was taken
    lr: float
    tail_drop: float = 0.0
    target_n: float | None = None
    distilling: bool = False
    router_grad_norm: float = 0.0  # before clipping; 0 for models without a learned router


TFLOPS_SEEN = "train/tflops_seen"


class MetricWindow:
    """Step statistics accumulated between two logging steps, turned into the logged metrics.

    `latest` holds the last metrics computed (with their step): what an early stop reports."""

    def __init__(self, config: ExperimentConfig, latest: dict | None = None):
        self.config = config
        self.routed = family_of(config.model).routed
        self.macs = macs_model(config)
        self.latest = dict(latest or {})
        self.reset()

    def due(self, step: int) -> bool:
        """Whether `step` logs metrics: every `logging.every` steps and the last."""
        return step % self.config.logging.every == 0 or step == self.config.train.steps

    def reset(self) -> None:
        self.stats = StepStats()
        self.steps = 0
        # Training compute before this window: the checkpoint's (or the last logged) cumulative count. A checkpoint
        # written without one (older code) leaves it unknown rather than restarting the count at 0.
        self.tflops_before = self.latest.get(TFLOPS_SEEN, 0.0 if not self.latest else None)
        self.grad_norm = 0.0
        self.router_grad_norm = 0.0
        self.distill_samples = 0.0
        self.started = time.perf_counter()
        self.last: StepResult | None = None

    def add(self, result: StepResult) -> None:
        self.stats += result.stats
        self.steps += 1
        self.grad_norm += result.grad_norm
        self.router_grad_norm += result.router_grad_norm
        if result.distilling:
            self.distill_samples += result.stats["samples"]
        self.last = result

    def metrics(self, step: int) -> dict[str, float]:
        """The logged metrics of the window ending at `step` (and "step"); also kept as `latest`."""
        s, n = self.stats, max(self.stats["samples"], 1.0)
        wall = max(time.perf_counter() - self.started, 1e-9)
        out = {"train/loss": s["loss"] / n, "train/diffusion_loss": s["diffusion_loss"] / n,
               "optim/grad_norm": self.grad_norm / max(self.steps, 1),
               "optim/lr": self.last.lr if self.last is not None else 0.0,
               "perf/images_per_s": n / wall, "perf/step_time_s": wall / max(self.steps, 1)}
        if self.routed:
            out.update(self._router_metrics(wall))
            macs = self.macs(n, s["kept_tokens"], s["kept_tokens_sq"])
        else:
            out["perf/tokens_per_s"] = n * self.config.model.num_tokens / wall
            macs = self.macs(n, 0.0, 0.0)
        if self.distill_samples:
            out["train/distill_loss"] = s["distill_loss"] / self.distill_samples
        # Training = forward + backward ~ 3 forward passes; 2 FLOPs per multiply-accumulate.
        out["perf/gflops_per_s"] = 6.0 * macs / wall / 1e9
        # Cumulative counts, so quality can be plotted against compute in MLflow (train/tflops_seen on the x axis).
        out["train/images_seen"] = float(step * self.config.train.global_batch)
        if self.tflops_before is not None:
            out[TFLOPS_SEEN] = self.tflops_before + 6.0 * macs / 1e12
        out["step"] = step
        self.latest = out
        return out

    def _router_metrics(self, wall: float) -> dict[str, float]:
        s, n = self.stats, max(self.stats["samples"], 1.0)
        kept, router_kept, grid = s["kept_tokens"], s["router_kept_tokens"], s["grid_tokens"]
        out = {"router/kept_fraction": kept / max(grid, 1.0),
               "router/compression_natural": grid / max(router_kept, 1.0),
               "router/compression_effective": grid / max(kept, 1.0),
               "perf/tokens_per_s": kept / wall}
        if self.config.model.learned_router:  # the random and grid controls have neither
            out["train/ratio_loss"] = s["ratio_loss"] / n
            out["optim/router_grad_norm"] = self.router_grad_norm / max(self.steps, 1)
        num_timesteps = self.config.diffusion.num_timesteps
        for b in range(TIMESTEP_BUCKETS):
            count = s.bucket_count(b)
            if count:
                lo, hi = b * num_timesteps // TIMESTEP_BUCKETS, (b + 1) * num_timesteps // TIMESTEP_BUCKETS - 1
                out[f"router/kept_fraction_t{lo:04d}_{hi:04d}"] = s.bucket_kept(b) / count
        if self.last is not None:
            out["router/tail_drop"] = float(self.last.tail_drop)
            if self.last.target_n is not None:
                out["router/target_n"] = float(self.last.target_n)
        return out


def macs_model(config: ExperimentConfig) -> Callable[[float, float, float], float]:
    """Total forward MACs of n samples given the sum of kept tokens and of their squares. A routed family's cost
    (dcdit.flops) is affine in the mean kept count and the mean squared count, so three evaluations fix it; any
    other family costs the same for every sample."""
    family, model = family_of(config.model), config.model
    if not family.routed:
        per_sample = family.forward_macs(model).total
        return lambda n, kept, kept_sq: n * per_sample
    c0 = family.forward_macs(model, kept_tokens=[0]).total
    c1_plus_c2 = family.forward_macs(model, kept_tokens=[1]).total - c0
    two_c1_plus_four_c2 = family.forward_macs(model, kept_tokens=[2]).total - c0
    c2 = (two_c1_plus_four_c2 - 2 * c1_plus_c2) / 2
    c1 = c1_plus_c2 - c2
    return lambda n, kept, kept_sq: n * c0 + c1 * kept + c2 * kept_sq


class LoopClock:
    """Wall and CPU time of a worker: its set-up (entry to the first step) and its training loop."""

    def __init__(self):
        self.entered = time.perf_counter()
        self.loop_started = self.loop_cpu_started = None

    def start_loop(self) -> None:
        self.loop_started, self.loop_cpu_started = time.perf_counter(), time.process_time()

    def timings(self) -> dict[str, float]:
        return {"time/loop_s": time.perf_counter() - self.loop_started,
                "time/loop_cpu_s": time.process_time() - self.loop_cpu_started,
                "time/worker_setup_s": self.loop_started - self.entered}
