"""The training objective: diffusion loss + lambda * ratio loss, with the N curriculum and multi-budget training.

One call computes the loss of one micro-batch for DiT or DC-DiT; the training loop owns the optimiser. Every random
draw is keyed by (seed, step) or (seed, step, the sample's place in the global batch), never by the batch's split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dcdit.data.vae import sample_seed
from dcdit.diffusion.sampling import NoiseSource, per_sample_generators
from dcdit.errors import DCDiTError
from dcdit.models.chunking import Routing, ratio_loss

DEFAULT_BUDGETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass(frozen=True, kw_only=True)
class ChunkingLossConfig:
    """How DC-DiT's router is trained; ignored by DiT baselines."""

    ratio_loss_weight: float = 0.03  # lambda, the "router penalty"
    ratio_group_size: int = 16  # samples per ratio-loss group (ratio_batch_size in the release)
    curriculum_start: float | None = None  # N at step 0, ramped linearly to the model's N; None: no curriculum
    curriculum_steps: int = 0
    multi_budget: bool = False  # train with a random tail-drop fraction per step (elastic inference)
    budget_fractions: tuple[float, ...] = DEFAULT_BUDGETS
    budget_warmup_steps: int = 5000  # steps with rho = 0 before multi-budget sampling starts

    def validate(self) -> None:
        if self.ratio_loss_weight < 0:
            raise DCDiTError(f"ratio_loss_weight={self.ratio_loss_weight} must be >= 0")
        if self.ratio_group_size < 1:
            raise DCDiTError(f"ratio_group_size={self.ratio_group_size} must be >= 1")
        if self.curriculum_start is not None and (self.curriculum_start <= 1 or self.curriculum_steps < 1):
            raise DCDiTError("curriculum_start must be > 1 and curriculum_steps >= 1 when the curriculum is on")
        if not self.budget_fractions or any(not 0 <= rho < 1 for rho in self.budget_fractions):
            raise DCDiTError(f"budget_fractions={list(self.budget_fractions)} must be non-empty values in [0, 1)")
        if self.budget_warmup_steps < 0:
            raise DCDiTError(f"budget_warmup_steps={self.budget_warmup_steps} must be >= 0")


def target_compression(config: ChunkingLossConfig, final_n: float, step: int) -> float:
    """N used by the ratio loss at `step`: the model's N, or the curriculum's linear ramp towards it."""
    if config.curriculum_start is None or step >= config.curriculum_steps:
        return float(final_n)
    frac = step / config.curriculum_steps
    return float(config.curriculum_start + frac * (final_n - config.curriculum_start))


def budget_for_step(config: ChunkingLossConfig, step: int, seed: int) -> float:
    """Tail-drop fraction rho for `step`: a function of (seed, step) only, so every DDP rank draws the same."""
    if not config.multi_budget or step < config.budget_warmup_steps:
        return 0.0
    return random.Random(seed * 1_000_003 + step).choice(config.budget_fractions)


@dataclass(frozen=True)
class SampleDraws:
    """What training draws for each sample of a micro-batch: its timestep, its noise, whether its label is dropped."""

    t: torch.Tensor  # (B,) long
    noise: torch.Tensor  # like x0
    drop: torch.Tensor  # (B,) bool: the label becomes the null class (classifier-free guidance's training)


def draw_samples(x0: torch.Tensor, *, seed: int, step: int, first: int, num_timesteps: int,
                 class_dropout_prob: float) -> SampleDraws:
    """Sample i of `x0` is sample `first + i` of step `step`'s global batch and draws t ~ U{0..T-1}, u ~ U[0, 1)
    (dropped when u < class_dropout_prob) and its noise, in that order, from its own CPU generator seeded by
    sample_seed(seed, step, first + i): the same numbers on any device, worker count and accumulation split."""
    gens = per_sample_generators([sample_seed(seed, step, first + i) for i in range(x0.shape[0])])
    t = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in gens])
    u = torch.cat([torch.rand(1, generator=g) for g in gens])
    noise = NoiseSource(gens).randn(x0.shape, device=x0.device, dtype=x0.dtype)
    return SampleDraws(t=t.to(x0.device), noise=noise, drop=(u < class_dropout_prob).to(x0.device))


@dataclass
class StepLoss:
    """The loss of one micro-batch and what the training loop logs about it."""

    loss: torch.Tensor  # scalar to backpropagate
    diffusion_loss: torch.Tensor
    ratio_loss: torch.Tensor | None
    timesteps: torch.Tensor  # (B,)
    routing: Routing | None
    tail_drop: float = 0.0
    target_n: float | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingObjective:
    """Diffusion loss for DiT; diffusion + lambda * ratio loss for a routed model such as DC-DiT (mask taken
    before tail dropping). `routed` is the model family's `routed` (dcdit.models.family_of(config).routed).

    `learned_router=False` (the random and grid controls, `ModelConfig.learned_router`): the budget is fixed by
    construction and nothing routes by gradient, so the objective is the diffusion loss alone; tail dropping and
    multi-budget training still apply.

    `class_dropout_prob` is the model's (`ModelConfig.class_dropout_prob`): the objective draws each sample's label
    dropout itself (`draw_samples`) and hands it to the model as `force_drop_ids`."""

    def __init__(self, diffusion, *, routed: bool, class_dropout_prob: float, downsample_factor: float | None = None,
                 chunking: ChunkingLossConfig | None = None, seed: int = 0, learned_router: bool = True):
        self.diffusion = diffusion
        self.routed = routed
        self.class_dropout_prob = class_dropout_prob
        self.learned_router = learned_router
        self.downsample_factor = downsample_factor
        self.chunking = chunking or ChunkingLossConfig()
        self.seed = seed

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, step: int, first: int = 0) -> StepLoss:
        """The loss of micro-batch (x0, y) of optimizer step `step`, whose first sample is sample `first` of the
        step's global batch."""
        draws = draw_samples(x0, seed=self.seed, step=step, first=first, num_timesteps=self.diffusion.num_timesteps,
                             class_dropout_prob=self.class_dropout_prob)
        t, noise, drop_ids = draws.t, draws.noise, draws.drop.long()
        xt = self.diffusion.q_sample(x0, t, noise)
        if not self.routed:
            output = model(xt, t, y, force_drop_ids=drop_ids)
            terms = self.diffusion.training_losses(output, x0, xt, t, noise)
            diffusion_loss = terms["loss"].mean()
            return StepLoss(loss=diffusion_loss, diffusion_loss=diffusion_loss, ratio_loss=None,
                            timesteps=t, routing=None, extras={k: v.mean() for k, v in terms.items()})
        rho = budget_for_step(self.chunking, step, self.seed)
        output, routing = model(xt, t, y, tail_drop=rho or None, return_routing=True, force_drop_ids=drop_ids)
        terms = self.diffusion.training_losses(output, x0, xt, t, noise)
        diffusion_loss = terms["loss"].mean()
        n = target_compression(self.chunking, self.downsample_factor, step)
        r_loss, loss = None, diffusion_loss
        if self.learned_router:
            r_loss = ratio_loss(routing.router_mask, routing.probs, n, self.chunking.ratio_group_size)
            loss = diffusion_loss + self.chunking.ratio_loss_weight * r_loss
        return StepLoss(loss=loss, diffusion_loss=diffusion_loss, ratio_loss=r_loss, timesteps=t,
                        routing=routing, tail_drop=rho, target_n=n, extras={k: v.mean() for k, v in terms.items()})
