"""The pieces of one optimizer step: results that do not depend on how the global batch is split into workers x
micro-steps, the learning-rate schedule and its warm-up as applied, bf16 steps, a non-finite gradient behind a finite
loss, the router's gradient norm and the EMA update."""

from __future__ import annotations

import math

import pytest
import torch
from dcdit_platform.config import build_config
from dcdit_platform.training.runtime import Runtime
from dcdit_platform.training.state import build_train_state
from dcdit_platform.training.step import (
    build_objective,
    ema_update,
    lr_at,
    router_grad_norm,
    train_step,
)
from helpers.training import DIT, max_abs_diff, step_in_process, tiny_config

from dcdit.models import build_model

LR = 2e-3  # tiny_config's
TOKENS = ("kept_tokens", "router_kept_tokens", "kept_tokens_sq")


pytestmark = pytest.mark.usefixtures("one_thread")  # summation-order comparisons with one intra-op thread


def split(accum: int, model: dict | None = None, **train) -> object:
    """tiny_config on one worker with `accum` micro-steps of its global batch of 8. Ratio groups of 2 samples, so
    that every micro-batch (8, 4 or 2 samples) holds whole groups and the ratio loss is split-independent; Adam's
    eps at 1e-6 (see the invariance test)."""
    sections = {"train": {"grad_accum": accum, "eps": 1e-6, "chunking": {"ratio_group_size": 2}, **train},
                "resources": {"num_workers": 1}}
    return build_config(tiny_config(**sections, **({"model": model} if model else {})))


@pytest.mark.parametrize("model", [None, DIT], ids=["dcdit", "dit"])
def test_the_split_into_micro_steps_changes_only_summation_order(model):
    """1, 2 and 4 micro-steps of the same global batch train the same weights up to float summation order.

    Tolerance: a sample that draws other noise (what per-micro-batch seeding did) moves weights by about one Adam
    step, 2 lr = 4e-3 after step 1 and 1.3e-2 after 4 (measured). Summation order changes a gradient by ~1e-7 of
    the terms summed (<= ~1e-2 here), and Adam turns a gradient change dg into an update change of at most
    lr dg / eps = 2e3 dg: ~2e-6 per step, 1e-5 after 4 steps. That needs eps = 1e-6: at the default 1e-8, Adam
    scales the rounding noise of gradients that are zero in exact arithmetic (the router's conv bias before its
    GroupNorm) up to lr / 50 per step (3.6e-5 after 4 steps, measured) - Adam's property, not the split's.
    Measured with eps 1e-6: <= 7e-8 after step 1, <= 6e-7 after 4 (DC-DiT), 3e-8 (DiT). DC-DiT's hard routing
    could flip a token with p within ~1e-7 of 0.5 and move the result discontinuously: kept-token counts are
    compared exactly first, so a flip shows as such, not as a weight difference."""
    runs = {accum: step_in_process(split(accum, model), 4) for accum in (1, 2, 4)}
    for accum in (2, 4):
        for (_, r_ref), (_, r) in zip(runs[1], runs[accum], strict=True):
            assert r.finite and r.stats["samples"] == 8
            assert [r.stats[k] for k in TOKENS] == [r_ref.stats[k] for k in TOKENS]
        assert max_abs_diff(runs[accum][0][0], runs[1][0][0]) <= 1e-6, accum
        assert max_abs_diff(runs[accum][3][0], runs[1][3][0]) <= 1e-5, accum
    if model is None:
        assert runs[1][0][1].stats["router_kept_tokens"] > 0  # DC-DiT routed some tokens, the sums mean something


def test_lr_warms_up_linearly_then_stays_constant():
    config = build_config(tiny_config(train={"lr": 1e-3, "warmup_steps": 4}))
    assert [lr_at(config, s) for s in (1, 2, 3, 4, 5, 100)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    constant = build_config(tiny_config(train={"lr": 3e-4}))  # warmup_steps 0: the paper's constant rate
    assert [lr_at(constant, s) for s in (1, 50)] == [3e-4, 3e-4]


def test_a_step_updates_at_the_warmed_up_rate():
    """Adam's first update is lr x g / (|g| + eps) = lr x sign(g) wherever |g| >> eps, so the largest weight change
    of step 1 is the rate the step used: lr / 4 in the first of 4 warm-up steps."""
    config = split(1, warmup_steps=4, grad_clip=0.0)
    before = {k: v.clone() for k, v in build_train_state(config, None, Runtime(torch.device("cpu"), "fp32"), 0,
                                                           1).model.state_dict().items()}
    (after, result), = step_in_process(config, 1)
    assert result.lr == LR / 4
    assert max_abs_diff(after, before) == pytest.approx(LR / 4, rel=1e-3)


def test_a_bf16_step_runs_the_backbone_in_bf16_and_matches_fp32_to_bf16_precision():
    config = split(1)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    grads, seen = {}, []
    for precision in ("bf16", "fp32"):
        runtime = Runtime(torch.device("cpu"), precision)
        state = build_train_state(config, None, runtime, 0, 1)
        state.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
        result = train_step(state, build_objective(config), x, y, step=1, config=config, runtime=runtime, rank=0,
                            world_size=1)
        assert result.finite and all(p.dtype == torch.float32 for p in state.model.parameters())  # fp32 masters
        grads[precision] = torch.cat([p.grad.flatten() for p in state.params if p.grad is not None])
    assert seen == [torch.bfloat16, torch.float32]
    # Same draws and weights: the gradients differ by bf16 rounding only (8-bit mantissa, ~0.4% per operation).
    rel = float((grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm())
    assert 1e-5 < rel < 0.05, rel


def test_a_non_finite_gradient_behind_a_finite_loss_skips_the_optimizer_step():
    config = split(1)
    runtime = Runtime(torch.device("cpu"), "fp32")
    state = build_train_state(config, None, runtime, 0, 1)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    state.model.final_layer.linear.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    result = train_step(state, build_objective(config), torch.randn(8, 3, 8, 8), torch.arange(8) % 4, step=1,
                        config=config, runtime=runtime, rank=0, world_size=1)
    assert math.isfinite(result.stats["loss"]) and result.stats["nonfinite"] == 0
    assert not result.finite and not math.isfinite(result.grad_norm)
    assert max_abs_diff(state.model.state_dict(), before) == 0.0 and not state.optimizer.state


def test_router_grad_norm_is_the_norm_of_the_router_parameters_gradients_only():
    config = build_config(tiny_config())
    model = build_model(config.model)
    router = list(model.router.parameters())
    for param in model.parameters():
        param.grad = torch.full_like(param, 100.0)  # everything else has a large gradient
    for i, param in enumerate(router):
        param.grad = torch.full_like(param, float(i + 1))
    by_hand = math.sqrt(sum((i + 1) ** 2 * p.numel() for i, p in enumerate(router)))
    assert router_grad_norm(model, config) == pytest.approx(by_hand, rel=1e-6)
    for router_kind in ("random", "grid"):  # the controls have no router parameters
        control = build_config(tiny_config(model={"router": router_kind}))
        assert router_grad_norm(build_model(control.model), control) == 0.0
    dit = build_config(tiny_config(model=DIT))
    assert router_grad_norm(build_model(dit.model), dit) == 0.0


def test_ema_moves_a_fraction_one_minus_decay_towards_the_model():
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([[1.0, -2.0]]))
        ema.bias.fill_(4.0)
        model.weight.copy_(torch.tensor([[3.0, 2.0]]))
        model.bias.fill_(0.0)
    ema_update(ema, model, decay=0.75)
    # 0.75 * ema + 0.25 * model, by hand
    assert torch.allclose(ema.weight, torch.tensor([[1.5, -1.0]])) and torch.allclose(ema.bias, torch.tensor([3.0]))
    assert torch.equal(model.weight, torch.tensor([[3.0, 2.0]]))  # the model is left as it was
    ema_update(ema, model, decay=0.0)
    assert torch.equal(ema.weight, model.weight)
