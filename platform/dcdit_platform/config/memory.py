"""How much memory one training worker needs at the configured batch, estimated before anything is allocated: the
training state per parameter plus the activations autograd keeps for one micro-batch, from the analytic model of
dcdit_platform.perf.memory. It is there to refuse a run that cannot fit, with the numbers, before Ray starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dcdit_platform.perf.memory import STATE_BYTES_PER_PARAM
from dcdit_platform.perf.memory import training_memory as step_memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker needs: `state` (parameters and optimizer) and `activations` (one micro-batch)."""

    params: int
    state: int
    activations: int
    micro_batch: int

    @property
    def total(self) -> int:
        return self.state + self.activations


def training_memory(config) -> MemoryEstimate:
    """The estimate for one worker of `config` (an ExperimentConfig): DDP's state and one micro-batch's activations
    at the configured precision, on the device the workers train on, a routed model keeping 1/N of its tokens."""
    device = "cuda" if config.resources.use_gpu else "cpu"
    step = step_memory(config.model, config.micro_batch, config.train.precision, device=device)
    return MemoryEstimate(params=step.params, state=step.state_total, activations=step.activation_total,
                          micro_batch=config.micro_batch)


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


__all__ = ["MemoryEstimate", "training_memory", "machine_memory", "gib", "STATE_BYTES_PER_PARAM"]
