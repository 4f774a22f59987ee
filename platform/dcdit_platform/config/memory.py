"""How much memory one training worker needs at the configured batch, estimated before anything is allocated: the
training state per parameter plus the activations autograd keeps for one micro-batch. Rough by design (within a
factor of about two): it is there to refuse a run that cannot fit, with the numbers, before Ray starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dcdit.models import count_params, family_of

# fp32 weights, gradients, Adam's two moments, the EMA copy and DDP's gradient buckets: 6 x 4 bytes.
STATE_BYTES_PER_PARAM = 24
# Tensors autograd keeps per token and width in one transformer block (qkv, attention output, the 4x MLP, norms and
# their inputs), counted as in Korthikanti et al. 2022 ("Reducing activation recomputation"), without dropout.
BLOCK_VALUES_PER_TOKEN_WIDTH = 17
# Per token and channel in one scaffold conv block (two norms, two activations, two convs and the skip).
SCAFFOLD_VALUES_PER_TOKEN_WIDTH = 10


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
    """The estimate for one worker of `config` (an ExperimentConfig)."""
    m = config.model
    params = count_params(m)
    b, e = config.micro_batch, 2 if config.train.precision == "bf16" else 4
    grid = m.input_size ** 2
    if family_of(m).routed:
        tokens = max(1.0, grid / m.downsample_factor)  # the backbone runs on the kept tokens
        widths = [max(a, c) for encoder in (True, False) for a, c in m.scaffold_block_widths(encoder=encoder)]
        scaffold = sum(grid * w * SCAFFOLD_VALUES_PER_TOKEN_WIDTH for w in widths)
    else:
        tokens, scaffold = float(m.num_tokens), 0.0
    # Per block: the token-width tensors plus the attention scores (heads x tokens^2, probabilities and their input).
    block = tokens * m.hidden_size * BLOCK_VALUES_PER_TOKEN_WIDTH + 2.5 * m.num_heads * tokens ** 2
    activations = int(b * e * (m.depth * block + scaffold))
    return MemoryEstimate(params=params, state=params * STATE_BYTES_PER_PARAM, activations=activations,
                          micro_batch=b)


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


__all__ = ["MemoryEstimate", "training_memory", "machine_memory", "gib"]
