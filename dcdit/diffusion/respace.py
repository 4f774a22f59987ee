"""Timestep respacing (ADM): sample with a subset of the training steps, e.g. 250 of 1000.

The kept steps define new betas from the original alphas_cumprod; the model still sees the original indices.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from dcdit.diffusion.gaussian import GaussianDiffusion
from dcdit.errors import DCDiTError


def _ddim_steps(num_timesteps: int, count: int) -> list[int]:
    """DDIM's evenly strided steps 0, s, 2s, ... for the first integer stride giving exactly `count` steps."""
    for stride in range(1, num_timesteps):
        steps = list(range(0, num_timesteps, stride))
        if len(steps) == count:
            return steps
    raise DCDiTError(f"cannot take exactly {count} evenly strided steps from {num_timesteps}; "
                     f"pick a count of the form ceil({num_timesteps}/stride) or use '{count}' instead of 'ddim{count}'")


def _parse_sections(section_counts: str | int | Sequence[int]) -> list[int]:
    """Section counts from 250, '250', '10,15,20' or [10, 15, 20]."""
    if isinstance(section_counts, int):
        return [section_counts]
    if isinstance(section_counts, str):
        try:
            return [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise DCDiTError(f"bad timestep respacing {section_counts!r}; "
                             "use e.g. '250', '10,15,20' or 'ddim50'") from None
    return [int(c) for c in section_counts]


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Sorted steps to keep: split [0, T) into equal sections and take evenly spaced steps (rounded) from each."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        count = section_counts[len("ddim"):]
        if not count.isdigit():
            raise DCDiTError(f"bad timestep respacing {section_counts!r}; use 'ddim' and a step count, e.g. 'ddim50'")
        return _ddim_steps(num_timesteps, int(count))
    counts = _parse_sections(section_counts)
    base_size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        # The first `extra` sections take one more step so the sections cover all T.
        size = base_size + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise DCDiTError(f"cannot take {count} steps from a section of {size} (of {num_timesteps} steps); "
                             f"use between 1 and {size}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Accumulate the float stride (not j * stride) so ties round exactly as ADM's kept sets do.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the original steps; `model_timesteps` maps back to the original indices."""

    def __init__(self, use_timesteps: Iterable[int], betas: np.ndarray, *, learn_sigma: bool = True):
        base = GaussianDiffusion(betas, learn_sigma=learn_sigma)
        keep = set(int(s) for s in use_timesteps)
        if not keep or min(keep) < 0 or max(keep) >= base.num_timesteps:
            raise DCDiTError(f"respaced steps must be a non-empty subset of [0, {base.num_timesteps})")
        self.original_num_steps = base.num_timesteps
        self.timestep_map = np.array(sorted(keep), dtype=np.int64)
        # beta'_k = 1 - abar(s_k) / abar(s_{k-1}) so that the spaced chain has the original abar at every kept step.
        kept_abar = base.alphas_cumprod[self.timestep_map]
        new_betas = 1.0 - kept_abar / np.append(1.0, kept_abar[:-1])
        super().__init__(new_betas, learn_sigma=learn_sigma)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original step indices for spaced indices t."""
        return torch.as_tensor(self.timestep_map, device=t.device)[t]
