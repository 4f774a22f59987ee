"""Measured memory of one training step on this machine, to check the analytic model (perf/memory.py): the bytes of
the tensors autograd saves for backward (each storage once, parameters excluded) and the running peak of the step's
allocations from torch.profiler's memory events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile

from dcdit.config import ModelConfig
from dcdit.diffusion import create_diffusion
from dcdit.flops import calibrate_router
from dcdit.models import build_model, family_of
from dcdit.objective import TrainingObjective, draw_samples


@dataclass(frozen=True)
class MeasuredStep:
    """`saved` bytes kept for backward by the step's forward pass; `peak` the highest total of live allocations
    during forward, backward and the optimizer step above what was allocated before it (None unless profiled);
    `kept_fraction` of a routed model's positions that its backbone ran on."""

    saved: int
    peak: int | None
    kept_fraction: float | None


def measure_step(config: ModelConfig, batch: int, precision: str = "fp32", *, kept_fraction: float | None = None,
                 seed: int = 0, peak: bool = False) -> MeasuredStep:
    """Build `config`, calibrate a routed model's router to keep `kept_fraction` (default 1/N), and measure one
    training step (the diffusion objective, backward, AdamW) at `batch` samples."""
    torch.manual_seed(seed)
    model = build_model(config).train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    y = torch.randint(0, config.num_classes, (batch,), generator=gen)
    routed = family_of(config).routed
    objective = TrainingObjective(create_diffusion(), routed=routed, downsample_factor=config.downsample_factor,
                                  class_dropout_prob=config.class_dropout_prob, seed=seed + 1)
    if routed:
        # On the very x_t, t and labels of the measured step, so that its router keeps the requested fraction.
        draws = draw_samples(x, seed=objective.seed, step=0, first=0, num_timesteps=1000,
                             class_dropout_prob=config.class_dropout_prob)
        xt = objective.diffusion.q_sample(x, draws.t, draws.noise)
        calibrate_router(model, xt, draws.t, torch.where(draws.drop, config.num_classes, y),
                         1.0 / config.downsample_factor if kept_fraction is None else kept_fraction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    routing = []

    def forward():
        with autocast:
            out = objective(model, x, y, step=0)
        routing.append(out.routing)
        return out.loss

    saved = count_saved_bytes(forward, model.parameters())
    kept = None if routing[0] is None else float(routing[0].kept.double().mean()) / config.num_tokens
    measured_peak = None
    if peak:
        measured_peak = profiled_peak(lambda: _step(objective, model, optimizer, x, y, autocast))
    return MeasuredStep(saved=saved, peak=measured_peak, kept_fraction=kept)


def count_saved_bytes(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the storages autograd saves for backward while `forward` runs, each storage once, leaving out the
    storages of `exclude` (the parameters). The graph is freed when this returns."""
    counter = _SavedBytes(exclude)
    with saved_tensors_hooks(counter.pack, counter.unpack):
        forward()
    return counter.total


class _SavedBytes:
    """saved_tensors_hooks that add up the storages of saved tensors, each once, leaving out excluded storages."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.params = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.params:
            self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _step(objective, model, optimizer, x, y, autocast) -> None:
    with autocast:
        loss = objective(model, x, y, step=0).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def profiled_peak(fn: Callable[[], object]) -> int:
    """Highest running total of the allocations (positive) and frees (negative) the profiler records while `fn`
    runs, in time order. The raw allocation events are read from the profiler's results: the per-op figures of
    `prof.events()` count an allocation once for every op it is nested in."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = best = 0
    for _, nbytes in events:
        live += nbytes
        best = max(best, live)
    return best


__all__ = ["MeasuredStep", "measure_step", "count_saved_bytes", "profiled_peak"]
