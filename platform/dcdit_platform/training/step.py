"""One optimizer step: the objective a worker trains, the learning-rate schedule, the forward/backward/clip/step
itself (`train_step`, which tells the objective where each micro-batch sits in the global batch, so that the result
does not depend on its split into workers x accumulation micro-steps) and the EMA update that follows it.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from dcdit.diffusion import create_diffusion
from dcdit.models import family_of
from dcdit.objective import TrainingObjective
from dcdit.distill import BlockDistiller
from dcdit_platform.config import ExperimentConfig
from dcdit_platform.training.metrics import StepResult, StepStats
from dcdit_platform.training.runtime import Runtime
from dcdit_platform.training.state import TrainState


def build_objective(config: ExperimentConfig) -> TrainingObjective:
    """The diffusion loss, plus lambda x the ratio loss for a model with a router."""
    diffusion = create_diffusion(num_timesteps=config.diffusion.num_timesteps, learn_sigma=config.model.learn_sigma)
    return TrainingObjective(diffusion, routed=family_of(config.model).routed,
                             class_dropout_prob=config.model.class_dropout_prob,
                             downsample_factor=config.model.downsample_factor, chunking=config.train.chunking,
                             seed=config.seed, learned_router=config.model.learned_router)


def lr_at(config: ExperimentConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, then constant (the paper's schedule)."""
    t = config.train
    return t.lr * min(1.0, step / t.warmup_steps) if t.warmup_steps else t.lr


@torch.no_grad()
def router_grad_norm(model: nn.Module, config: ExperimentConfig) -> float:
    """L2 norm of the router's gradient before clipping (0 without a learned router): how strongly the STE gate and
    the ratio loss move the routing, a diagnostic for budgets that drift or collapse."""
    grads = [p.grad for p in family_of(config.model).router_parameters(model) if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over every parameter."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def train_step(state: TrainState, objective: TrainingObjective, x: torch.Tensor, y: torch.Tensor, *, step: int,
               config: ExperimentConfig, runtime: Runtime, rank: int, world_size: int,
               distiller: BlockDistiller | None = None) -> StepResult:
    """Forward/backward over `train.grad_accum` micro-batches of this rank's batch (DDP syncs on the last),
    statistics all-reduced, then, when loss and gradients are finite, clip and step at `lr_at(step)`. The caller
    updates the EMA. This rank's batch is samples [rank * B, (rank + 1) * B) of the step's global batch (the
    reader's contiguous slices), and each sample's draws are keyed by its place there."""
    t = config.train
    lr = lr_at(config, step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    model = state.ddp
    stats = StepStats(device=x.device)
    micro = x.shape[0] // t.grad_accum
    tail_drop, target_n = 0.0, None
    for m in range(t.grad_accum):
        xm, ym = x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]
        sync = m == t.grad_accum - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with runtime.autocast():
                out = objective(model, xm, ym, step, first=rank * x.shape[0] + m * micro)
            loss = out.loss
            distill = None
            if distiller is not None:
                distill = distiller.loss()
                loss = loss + t.distill_weight * distill
            (loss / t.grad_accum).backward()
        stats.record(out, loss, distill, config.diffusion.num_timesteps)
        if out.routing is not None:
            tail_drop, target_n = out.tail_drop, out.target_n
    if world_size > 1:
        stats.all_reduce()
    stats = stats.cpu()

    router_norm = router_grad_norm(state.model, config)

    def result(grad_norm: float, finite: bool) -> StepResult:
        return StepResult(stats, grad_norm, finite, lr, tail_drop, target_n, distiller is not None, router_norm)

    if stats["nonfinite"] > 0:
        return result(float("nan"), False)
    norm = torch.nn.utils.clip_grad_norm_(state.params, t.grad_clip if t.grad_clip > 0 else float("inf"))
    grad_norm = float(norm)
    if not math.isfinite(grad_norm):
        return result(grad_norm, False)
    state.optimizer.step()
    return result(grad_norm, True)
