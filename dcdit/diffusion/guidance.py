"""Classifier-free guidance as a model wrapper, including DiT's 3-channel legacy and DC-DiT's Lite-CFG.

The wrapper runs the conditional and unconditional branches in one batched call and returns a model output
of the original batch size, so any sampler can use it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dcdit.errors import DCDiTError


def cfg_model_fn(model: Callable[..., torch.Tensor], scale: float, null_class: int, *,
                 guided_channels: int | None = None,
                 tail_drop: tuple[float, float] | None = None) -> Callable[..., torch.Tensor]:
    """model_fn(x, t, y, **kw) returning eps_uncond + scale * (eps_cond - eps_uncond) on the guided channels.

    guided_channels: None guides every eps channel; 3 is DiT's legacy (the remaining eps channels and the
    variance channels come from the conditional branch). tail_drop: (rho_cond, rho_uncond), passed to the model
    as a per-sample `tail_drop` tensor; leave None for models without tail dropping (DiT). Other model kwargs go
    unchanged to the doubled batch, so they must apply to both branches (a float tail_drop does).
    """
    if guided_channels is not None and guided_channels < 1:
        raise DCDiTError(f"guided_channels must be None or a positive channel count, got {guided_channels}")

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **model_kwargs) -> torch.Tensor:
        batch, channels = x.shape[:2]
        kwargs = dict(model_kwargs)
        if tail_drop is not None:
            if "tail_drop" in kwargs:
                raise DCDiTError("tail_drop was given both to cfg_model_fn and in model_kwargs; give it once")
            rho_cond, rho_uncond = tail_drop
            kwargs["tail_drop"] = torch.tensor([rho_cond] * batch + [rho_uncond] * batch,
                                               device=x.device, dtype=torch.float32)
        y_null = torch.full_like(y, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), **kwargs)
        cond, uncond = out[:batch], out[batch:]
        g = channels if guided_channels is None else min(guided_channels, channels)
        eps = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([eps, cond[:, g:]], dim=1)

    return guided


@dataclass(frozen=True)
class Guidance:
    """A classifier-free guidance setting: scale, guided eps channels, per-branch tail-drop fractions."""

    scale: float
    guided_channels: int | None = None
    tail_drop: tuple[float, float] | None = None

    def wrap(self, model: Callable[..., torch.Tensor], null_class: int) -> Callable[..., torch.Tensor]:
        """The guided model_fn for `model`."""
        return cfg_model_fn(model, self.scale, null_class, guided_channels=self.guided_channels,
                            tail_drop=self.tail_drop)


# DC-DiT's Lite-CFG: a cheap unconditional branch (90% of kept tokens tail-dropped) at scale 1.25. The authors'
# release guides the first 3 latent channels only (inherited from DiT), which the reported FIDs therefore use.
LITE_CFG = Guidance(scale=1.25, guided_channels=3, tail_drop=(0.0, 0.9))
