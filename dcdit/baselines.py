"""The DiT baselines DC-DiT is compared against (arXiv 2603.06351 v1): parameter-matched and FLOP-matched DiTs.

Rule "deepen" (default): keep the DC-DiT's width, heads and MLP ratio and add DiT blocks until the DiT's parameters
(or forward MACs per sample) are closest to the DC-DiT's. It reproduces the parameter counts v1 reports for its
parameter-matched DiTs (B 141M: depth 13; XL 699M: depth 29) and for its FLOP-matched ones where the paper's
numbers are consistent with whole blocks (B/4 301M = depth 28, XL/2 818M = depth 34, XL/4 1201M = depth 50): v1
evidently deepened. Rule "widen" keeps depth and heads and grows the hidden size in steps that keep the head
dimension even and the width divisible by 4 (the 2D sin-cos embedding), for when depth must stay fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from dcdit.config import ModelConfig
from dcdit.errors import DCDiTError
from dcdit.flops import dit_macs, dit_params
from dcdit.models import count_params
from dcdit.models.family import family_of, forward_macs

MatchRule = Literal["deepen", "widen"]


def default_patch_size(dcdit_config: ModelConfig) -> int:
    """The DiT patch whose token count the DC-DiT's target compression matches: N = 4 -> 2, N = 16 -> 4."""
    return max(1, round(math.sqrt(dcdit_config.downsample_factor)))


def dit_counterpart(dcdit_config: ModelConfig, patch_size: int | None = None, **changes) -> ModelConfig:
    """The DiT with the DC-DiT's backbone (depth, width, heads, MLP ratio), data shape and conditioning."""
    _require_dcdit(dcdit_config)
    return ModelConfig(
        arch="dit", depth=dcdit_config.depth, hidden_size=dcdit_config.hidden_size,
        num_heads=dcdit_config.num_heads, input_size=dcdit_config.input_size,
        in_channels=dcdit_config.in_channels, num_classes=dcdit_config.num_classes,
        learn_sigma=dcdit_config.learn_sigma, class_dropout_prob=dcdit_config.class_dropout_prob,
        mlp_ratio=dcdit_config.mlp_ratio, patch_size=patch_size or default_patch_size(dcdit_config),
    ).replace(**changes)


def param_matched_dit(dcdit_config: ModelConfig, patch_size: int | None = None,
                      rule: MatchRule = "deepen") -> ModelConfig:
    """The DiT whose parameter count is closest to the DC-DiT's under `rule` (see the module docstring)."""
    target = count_params(dcdit_config)
    return _match(dcdit_config, patch_size, rule, target, dit_params)


def flop_matched_dit(dcdit_config: ModelConfig, patch_size: int | None = None, kept_fraction: float | None = None,
                     rule: MatchRule = "deepen") -> ModelConfig:
    """The DiT whose forward MACs per sample are closest to the DC-DiT's at `kept_fraction` (default 1/N)."""
    target = forward_macs(dcdit_config, kept_fraction).total
    return _match(dcdit_config, patch_size, rule, target, lambda c: dit_macs(c).total)


def _match(dcdit_config: ModelConfig, patch_size: int | None, rule: MatchRule, target: float,
           metric: Callable[[ModelConfig], float]) -> ModelConfig:
    base = dit_counterpart(dcdit_config, patch_size)
    if rule == "deepen":
        # The metric is affine in depth: two evaluations give the per-block cost, then round to the nearest depth.
        per_block = metric(base.replace(depth=2)) - metric(base.replace(depth=1))
        fixed = metric(base.replace(depth=1)) - per_block
        depth = max(1, round((target - fixed) / per_block))
        return base.replace(depth=depth)
    if rule == "widen":
        step = math.lcm(4, 2 * base.num_heads)
        candidates = [base.replace(hidden_size=w) for w in range(step, 8 * base.hidden_size + 1, step)]
        return min(candidates, key=lambda c: abs(metric(c) - target))
    raise DCDiTError(f"unknown matching rule {rule!r}; choose 'deepen' or 'widen'")


def _require_dcdit(config: ModelConfig) -> None:
    if not family_of(config).routed:
        raise DCDiTError(f"baselines are derived from a DC-DiT config, got arch={config.arch!r}")


__all__ = ["param_matched_dit", "flop_matched_dit", "dit_counterpart", "default_patch_size"]
