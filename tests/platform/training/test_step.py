"""The pieces of one optimizer step: per-micro-batch seeds, the learning-rate schedule, the router's gradient norm
and the EMA update."""

from __future__ import annotations

import math

import pytest
import torch
from dcdit_platform.config import build_config
from dcdit_platform.training.step import ema_update, lr_at, micro_seed, router_grad_norm
from helpers.training import tiny_config

from dcdit.models import build_model


def test_micro_seed_depends_on_seed_step_and_index_only():
    seeds = {micro_seed(7, 3, i) for i in range(64)}
    assert len(seeds) == 64  # every micro-batch of a step draws its own noise
    assert micro_seed(7, 3, 5) == micro_seed(7, 3, 5)  # reproducible, whichever worker computes it
    assert len({micro_seed(7, 3, 5), micro_seed(8, 3, 5), micro_seed(7, 4, 5)}) == 3
    assert all(0 <= s < 2 ** 63 for s in seeds)  # torch.manual_seed takes it as is
    # Fixed by its definition, the 8-byte blake2b of "dcdit/0/1/0" read little-endian, halved (computed with
    # hashlib on its own): checkpoints of existing runs resume only if it never changes.
    assert micro_seed(0, 1, 0) == 9213334438978157127


def test_lr_warms_up_linearly_then_stays_constant():
    config = build_config(tiny_config(train={"lr": 1e-3, "warmup_steps": 4}))
    assert [lr_at(config, s) for s in (1, 2, 3, 4, 5, 100)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    constant = build_config(tiny_config(train={"lr": 3e-4}))  # warmup_steps 0: the paper's constant rate
    assert [lr_at(constant, s) for s in (1, 50)] == [3e-4, 3e-4]


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
    dit = build_config(tiny_config(model={"arch": "dit", "depth": 2, "hidden_size": 32, "num_heads": 2,
                                          "input_size": 8, "in_channels": 3, "num_classes": 4, "patch_size": 2}))
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
