"""Named training statistics from hand-made micro-batches and steps: the sums a step records, the metrics a window
turns them into (names and means, for a routed DC-DiT and a DiT without a router), and the FLOP model behind
perf/gflops_per_s checked against dcdit.flops."""

from __future__ import annotations

import math

import pytest
import torch
from dcdit_platform.config import build_config
from dcdit_platform.training.metrics import MetricWindow, StepResult, StepStats, macs_model
from helpers.training import tiny_config

from dcdit.flops import dcdit_macs, dit_macs
from dcdit.models.chunking import Routing
from dcdit.objective import StepLoss

DIT = {"arch": "dit", "depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 3,
       "num_classes": 4, "patch_size": 2}
COMMON = {"train/loss", "train/diffusion_loss", "optim/grad_norm", "optim/lr", "perf/images_per_s",
          "perf/step_time_s", "perf/tokens_per_s", "perf/gflops_per_s", "train/images_seen", "step"}
ROUTER = {"train/ratio_loss", "optim/router_grad_norm", "router/kept_fraction", "router/compression_natural",
          "router/compression_effective", "router/tail_drop", "router/target_n"}


def _routing(mask: list[list[int]], router_mask: list[list[int]]) -> Routing:
    m = torch.tensor(mask, dtype=torch.bool)
    return Routing(probs=m.float(), router_mask=torch.tensor(router_mask, dtype=torch.bool), mask=m,
                   grid_size=(2, 2))


def _loss(loss: float, diffusion: float, timesteps: list[int], ratio: float | None = None,
          routing: Routing | None = None) -> StepLoss:
    return StepLoss(loss=torch.tensor(loss), diffusion_loss=torch.tensor(diffusion),
                    ratio_loss=None if ratio is None else torch.tensor(ratio), timesteps=torch.tensor(timesteps),
                    routing=routing, tail_drop=0.25 if routing is not None else 0.0,
                    target_n=4.0 if routing is not None else None)


def _routed_stats() -> StepStats:
    """Two micro-batches of 2 samples on a 4-token grid: kept 2+1 and 4+3 tokens, the router chose 3+1 and 4+4."""
    stats = StepStats()
    first = _loss(0.5, 0.4, [100, 900], ratio=0.2, routing=_routing([[1, 1, 0, 0], [1, 0, 0, 0]],
                                                                      [[1, 1, 1, 0], [1, 0, 0, 0]]))
    second = _loss(0.7, 0.5, [150, 450], ratio=0.4, routing=_routing([[1, 1, 1, 1], [1, 1, 1, 0]],
                                                                       [[1, 1, 1, 1], [1, 1, 1, 1]]))
    stats.record(first, first.loss, None, 1000)
    stats.record(second, second.loss, torch.tensor(0.3), 1000)  # the backpropagated loss would include it
    return stats


def test_a_step_records_named_sums_weighted_by_samples():
    s = _routed_stats()
    assert s["loss"] == pytest.approx(0.5 * 2 + 0.7 * 2) and s["diffusion_loss"] == pytest.approx(0.4 * 2 + 0.5 * 2)
    assert s["ratio_loss"] == pytest.approx(0.2 * 2 + 0.4 * 2) and s["distill_loss"] == pytest.approx(0.3 * 2)
    assert (s["samples"], s["kept_tokens"], s["router_kept_tokens"], s["grid_tokens"]) == (4, 10, 12, 16)
    assert s["kept_tokens_sq"] == 2 ** 2 + 1 + 4 ** 2 + 3 ** 2 and s["nonfinite"] == 0
    # Timestep buckets of 200: 100 and 150 -> 0, 450 -> 2, 900 -> 4; kept fractions 2/4, 4/4 | 3/4 | 1/4.
    assert [s.bucket_count(b) for b in range(5)] == [2, 0, 1, 0, 1]
    assert [s.bucket_kept(b) for b in range(5)] == [1.5, 0.0, 0.75, 0.0, 0.25]

    nan = _loss(float("nan"), 0.4, [10, 20])
    s.record(nan, nan.loss, None, 1000)
    assert s["nonfinite"] == 1 and s["kept_tokens"] == 10  # no routing: token counts unchanged
    assert math.isnan(s["loss"])


def test_stats_add_up_elementwise():
    total = StepStats()
    total += _routed_stats()
    total += _routed_stats()
    assert total["samples"] == 8 and total["kept_tokens"] == 20 and total.bucket_count(0) == 4


def test_routed_window_means_and_names():
    config = build_config(tiny_config())
    window = MetricWindow(config)
    window.add(StepResult(_routed_stats(), grad_norm=1.0, finite=True, lr=1e-3, tail_drop=0.1, target_n=3.0,
                          router_grad_norm=0.5))
    window.add(StepResult(_routed_stats(), grad_norm=3.0, finite=True, lr=2e-3, tail_drop=0.25, target_n=4.0,
                          router_grad_norm=0.25))
    m = window.metrics(7)
    assert set(m) == COMMON | ROUTER | {"router/kept_fraction_t0000_0199", "router/kept_fraction_t0400_0599",
                                        "router/kept_fraction_t0800_0999", "train/tflops_seen"}  # no distill loss
    assert m["step"] == 7 and window.latest is m
    assert m["train/loss"] == pytest.approx(2.4 / 4) and m["train/diffusion_loss"] == pytest.approx(1.8 / 4)
    assert m["train/ratio_loss"] == pytest.approx(1.2 / 4)
    assert m["optim/grad_norm"] == 2.0 and m["optim/lr"] == 2e-3  # the mean norm; the last step's lr
    assert m["optim/router_grad_norm"] == 0.375
    assert m["router/kept_fraction"] == pytest.approx(10 / 16)
    assert m["router/compression_natural"] == pytest.approx(16 / 12)
    assert m["router/compression_effective"] == pytest.approx(16 / 10)
    assert m["router/kept_fraction_t0000_0199"] == pytest.approx(1.5 / 2)
    assert m["router/kept_fraction_t0400_0599"] == pytest.approx(0.75)
    assert m["router/kept_fraction_t0800_0999"] == pytest.approx(0.25)
    assert (m["router/tail_drop"], m["router/target_n"]) == (0.25, 4.0)  # of the last step
    # Both rates divide by the same wall time: their ratio is the FLOPs per image (3 forward passes, 2 per MAC).
    per_image = 6 * dcdit_macs(config.model, kept_tokens=[2, 1, 4, 3]).total / 1e9
    assert m["perf/gflops_per_s"] / m["perf/images_per_s"] == pytest.approx(per_image, rel=1e-9)
    assert m["perf/tokens_per_s"] / m["perf/images_per_s"] == pytest.approx(10 / 4)
    # Cumulative counts from a fresh run: step x global batch (8) images, and 2 steps of 4 samples at 3 forwards.
    assert m["train/images_seen"] == 7 * 8
    assert m["train/tflops_seen"] == pytest.approx(2 * per_image * 4 / 1e3, rel=1e-9)
    window.reset()  # logged: the next window adds to this count
    window.add(StepResult(_routed_stats(), grad_norm=1.0, finite=True, lr=1e-3))
    assert window.metrics(8)["train/tflops_seen"] == pytest.approx(3 * per_image * 4 / 1e3, rel=1e-9)
    resumed = MetricWindow(config, latest={"train/tflops_seen": 2.5, "step": 8})  # a checkpoint's count goes on
    resumed.add(StepResult(_routed_stats(), grad_norm=1.0, finite=True, lr=1e-3))
    assert resumed.metrics(9)["train/tflops_seen"] == pytest.approx(2.5 + per_image * 4 / 1e3, rel=1e-9)


def test_router_controls_log_routing_but_no_ratio_loss_or_router_gradient():
    window = MetricWindow(build_config(tiny_config(model={"router": "random"})))
    window.add(StepResult(_routed_stats(), grad_norm=1.0, finite=True, lr=1e-3, tail_drop=0.1, target_n=4.0))
    m = window.metrics(1)
    assert "train/ratio_loss" not in m and "optim/router_grad_norm" not in m
    assert m["router/kept_fraction"] == pytest.approx(10 / 16) and "router/kept_fraction_t0000_0199" in m


def test_distill_loss_is_averaged_over_distilling_steps_only():
    window = MetricWindow(build_config(tiny_config()))
    window.add(StepResult(_routed_stats(), grad_norm=1.0, finite=True, lr=1e-3, distilling=True))
    window.add(StepResult(StepStats(), grad_norm=1.0, finite=True, lr=1e-3))
    assert window.metrics(2)["train/distill_loss"] == pytest.approx(0.6 / 4)
    window.reset()
    window.add(StepResult(_routed_stats(), grad_norm=1.0, finite=True, lr=1e-3))
    assert "train/distill_loss" not in window.metrics(3) and window.steps == 1


def test_window_of_a_model_without_a_router():
    config = build_config(tiny_config(model=DIT))
    stats = StepStats()
    for loss in (0.9, 1.1):
        out = _loss(loss, loss, [3, 700])
        stats.record(out, out.loss, None, 1000)
    assert stats["kept_tokens"] == 0 and stats["ratio_loss"] == 0
    window = MetricWindow(config, latest={"train/loss": 5.0, "step": 4})
    assert window.latest == {"train/loss": 5.0, "step": 4}  # what a checkpoint logged, until the next metrics
    window.add(StepResult(stats, grad_norm=0.5, finite=True, lr=1e-4))
    m = window.metrics(5)
    assert set(m) == COMMON  # the checkpoint resumed from predates train/tflops_seen: unknown, not restarted at 0
    assert m["train/loss"] == pytest.approx(1.0) and m["optim/lr"] == 1e-4
    assert m["perf/tokens_per_s"] / m["perf/images_per_s"] == pytest.approx(16)  # (8 / 2) ** 2 patches
    assert m["perf/gflops_per_s"] / m["perf/images_per_s"] == pytest.approx(6 * dit_macs(config.model).total / 1e9)


def test_flop_model_is_affine_in_kept_tokens_for_a_router_and_constant_without():
    routed = build_config(tiny_config()).model
    macs = macs_model(build_config(tiny_config()))
    for counts in ([16, 16], [3, 5, 9], [1]):
        expected = len(counts) * dcdit_macs(routed, kept_tokens=counts).total
        assert macs(len(counts), sum(counts), sum(c * c for c in counts)) == pytest.approx(expected, rel=1e-12)
    dit = build_config(tiny_config(model=DIT))
    flat = macs_model(dit)
    assert flat(3, 0.0, 0.0) == flat(3, 99.0, 999.0) == 3 * dit_macs(dit.model).total
