"""FLOP accounting against the DiT paper's table, measured counts on real batches, and the derived baselines."""

import pytest
import torch

from dcdit.baselines import flop_matched_dit, param_matched_dit
from dcdit.config import ModelConfig, preset
from dcdit.flops import (calibrate_router, dcdit_macs, dit_macs, dit_params, flop_counter, lite_cfg_branches,
                         measure_macs, register_varlen_attention_flops, sampling_tflops, tflops_per_image)
from dcdit.models import build_model, count_params, forward_macs

# Peebles & Xie, Table 4: forward "Gflops" (multiply-accumulates) at 256px, latent 32x32.
DIT_PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}

TINY_DCDIT = dict(arch="dcdit", depth=2, hidden_size=128, num_heads=4, input_size=16, num_classes=10)


@pytest.mark.parametrize("name", list(DIT_PAPER_GFLOPS))
def test_dit_macs_reproduce_the_dit_paper_table(name):
    paper = DIT_PAPER_GFLOPS[name]
    ours = dit_macs(preset(name)).gmacs
    # Half a unit of the printed last digit (rounding) plus 0.1%: every entry is within this; most round exactly.
    assert abs(ours - paper) <= 0.005 + 1e-3 * paper, (name, ours, paper)


def test_dit_xl2_terms_the_paper_counted():
    macs = dit_macs(preset("DiT-XL/2"))
    assert round(macs.gmacs, 1) == 118.6
    # Without adaLN or without attention the table cannot be matched: both are counted.
    assert macs.gmacs - macs.terms["adaln"] / 1e9 < 118.64 - 0.2
    assert macs.gmacs - macs.terms["attention"] / 1e9 < 118.64 - 4.0


@pytest.mark.parametrize("config", [
    ModelConfig(arch="dit", depth=2, hidden_size=64, num_heads=4, input_size=8, patch_size=2, num_classes=10),
    ModelConfig(arch="dit", depth=3, hidden_size=96, num_heads=3, input_size=16, patch_size=4, learn_sigma=False,
                class_dropout_prob=0.0, mlp_ratio=2.0),
])
def test_dit_measured_equals_analytic_and_params_closed_form(config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    x = torch.randn(3, config.in_channels, config.input_size, config.input_size)
    t, y = torch.randint(0, 1000, (3,)), torch.randint(0, config.num_classes, (3,))
    assert measure_macs(model, x, t, y) == dit_macs(config).total
    assert dit_params(config) == sum(p.numel() for p in model.parameters()) == count_params(config)


def test_dit_s2_measured_matches_the_paper():
    config = preset("DiT-S/2")
    model = build_model(config).eval()
    x, t, y = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.tensor([3])
    assert measure_macs(model, x, t, y) / 1e9 == pytest.approx(6.06, abs=0.005)


def _dcdit_batch(config, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    return x, torch.randint(0, 1000, (batch,), generator=gen), torch.randint(0, config.num_classes, (batch,),
                                                                               generator=gen)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_dcdit_measured_matches_analytic_at_the_kept_counts(fraction):
    config = ModelConfig(**TINY_DCDIT)
    torch.manual_seed(0)
    model = build_model(config).eval()
    x, t, y = _dcdit_batch(config, 4)
    kept = calibrate_router(model, x, t, y, fraction)
    assert abs(float(kept.double().mean()) / config.num_tokens - fraction) < 0.02
    measured = measure_macs(model, x, t, y)
    analytic = dcdit_macs(config, kept_tokens=kept)
    # De-chunk smoothing runs padded to the batch's longest sample (B * max M^2 d); that is the only difference.
    pad_excess = config.hidden_size * (kept.max() ** 2 - (kept.double() ** 2).mean()).item()
    assert measured == pytest.approx(analytic.total + pad_excess, rel=1e-9)
    assert measured == pytest.approx(analytic.total, rel=0.03)


def test_dcdit_s_measured_matches_analytic_on_a_real_batch():
    config = preset("DC-DiT-S")
    torch.manual_seed(0)
    model = build_model(config).eval()
    x, t, y = _dcdit_batch(config, 2)
    kept = calibrate_router(model, x, t, y, 0.25)
    measured = measure_macs(model, x, t, y) / 1e9
    assert measured == pytest.approx(dcdit_macs(config, kept_tokens=kept).gmacs, rel=0.01)
    assert measured == pytest.approx(forward_macs(config).gmacs, rel=0.05)


def test_dcdit_packed_attention_is_counted_as_sum_of_squared_lengths():
    config = ModelConfig(**TINY_DCDIT)
    torch.manual_seed(1)
    model = build_model(config).eval()
    x, t, y = _dcdit_batch(config, 4, seed=1)
    kept = calibrate_router(model, x, t, y, 0.3)
    assert len(set(kept.tolist())) > 1, "the test needs unequal lengths"
    with flop_counter() as counter, torch.no_grad():
        model(x, t, y)
    # Only the blocks' attention calls SDPA (the loop backend, once per sample and block).
    attention_flops = counter.get_flop_counts()["Global"][torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]
    expected = config.depth * 2 * 2 * config.hidden_size * int((kept.long() ** 2).sum())
    assert attention_flops == expected
    assert attention_flops < config.depth * 4 * config.hidden_size * len(kept) * int(kept.max()) ** 2


def test_dcdit_analytic_default_is_one_over_n_and_scaffold_is_counted():
    config = preset("DC-DiT-B")
    macs = forward_macs(config)
    assert macs.kept_tokens == 256
    backbone = sum(macs.terms[k] for k in ("qkv", "attention", "proj", "mlp", "adaln"))
    assert backbone / 1e9 == pytest.approx(dit_macs(preset("DiT-B/2")).gmacs - 0.02, abs=0.02)
    assert {"encoder", "router", "residual_proj", "dechunk", "decoder"} <= set(macs.terms)
    assert macs.gmacs > dit_macs(preset("DiT-B/2")).gmacs
    assert dcdit_macs(config, 1 / 16).gmacs < macs.gmacs


def test_v2_convention_adds_three_flops_per_attention_score():
    config = preset("DiT-S/2")
    macs = dit_macs(config)
    scores = config.depth * config.num_heads * 256**2
    assert macs.attention_scores == scores
    assert macs.v2_gflops * 1e9 == pytest.approx(2 * macs.total + 3 * scores)
    # H L^2 (4 d_head + 3) per block inside attention, 2 FLOPs per MAC elsewhere.
    head_dim = config.hidden_size // config.num_heads
    inside = scores * (4 * head_dim + 3)
    assert macs.v2_gflops * 1e9 == pytest.approx(2 * (macs.total - macs.terms["attention"]) + inside)


def test_v2_flops_of_a_packed_batch_are_the_attention_scores_plus_the_rest_by_hand():
    config = ModelConfig(arch="dcdit", depth=1, hidden_size=8, num_heads=2, input_size=4, in_channels=1,
                         num_classes=10, scaffold_width=4, encoder_blocks=1, decoder_blocks=1)
    lengths = [2, 3, 5]  # kept tokens of three packed samples, 16 grid positions each
    per_sample = dcdit_macs(config, kept_tokens=lengths).v2_gflops * 1e9
    # By hand, MACs of the whole batch outside attention (d = 8, scaffold w = 4, L = 16, router width d/4 = 2):
    positions, kept, kept_sq = 16, sum(lengths), sum(n * n for n in lengths)
    per_sample_terms = (9 * 1 * 4 * positions  # patch-1 embed conv 3x3, 1 -> 4 channels
                        + 256 * 8 + 8 * 8  # timestep MLP
                        + (9 * 4 * 4 + 9 * 4 * 8 + 4 * 8) * positions + 8 * 4  # encoder block 4 -> 8 (+ skip, cond)
                        + 8 * 8 * positions  # residual projection
                        + (8 * 2 + 9 * 2 * 2 + 9 * 2 * 2 + 2) * positions  # router
                        + 6 * 8 * 8  # adaLN, once per sample
                        + (9 * 8 * 4 + 9 * 4 * 4 + 8 * 4) * positions + 8 * 4  # decoder block 8 -> 4
                        + 2 * 8 * 4 + 4 * 2 * positions)  # final adaLN and linear (2 output channels)
    per_token_terms = 3 * 64 + 64 + 2 * 8 * 32  # qkv, proj, MLP on each kept token
    rest_macs = 3 * per_sample_terms + per_token_terms * kept + 8 * kept_sq  # + de-chunk's M x M smoothing
    attention = 2 * kept_sq * (4 * 4 + 3)  # H * sum_b L_b^2 * (4 d_head + 3), one block
    assert 3 * per_sample == pytest.approx(2 * rest_macs + attention, rel=1e-12)
    assert 2 * rest_macs + attention == 141252  # the same sum written out once


@pytest.mark.parametrize("name,paper_tflops", [("DiT-S/2", 3.02), ("DiT-B/2", 11.46), ("DiT-L/2", 40.21),
                                               ("DiT-XL/2", 59.00)])
def test_tflops_per_image_is_within_a_percent_of_the_v2_table(name, paper_tflops):
    # DC-DiT v2's table: TFLOPs per image over 250 steps, no guidance (the DiT rows; its counter sees a little less).
    assert tflops_per_image(dit_macs(preset(name)), 250) == pytest.approx(paper_tflops, rel=0.01)


def test_cfg_doubles_and_lite_cfg_runs_the_unconditional_branch_on_a_tenth_of_the_kept_tokens():
    config = preset("DC-DiT-B")
    cond, uncond = lite_cfg_branches(config)
    assert (cond.kept_tokens, uncond.kept_tokens) == (pytest.approx(256), pytest.approx(25.6))
    assert tflops_per_image(cond, 250, cond) == pytest.approx(2 * 250 * cond.v2_gflops / 1e3)
    assert tflops_per_image(cond, 250, uncond) == pytest.approx(250 * (cond.v2_gflops + uncond.v2_gflops) / 1e3)
    rho_cond, _ = lite_cfg_branches(config, tail_drop=0.2)
    assert rho_cond.kept_tokens == pytest.approx(256 * 0.8)


@torch.library.custom_op("dcdit_test::varlen_attention_forward", mutates_args=())
def _standin_varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                            max_seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU stand-in with flash-attn's varlen layout: (T, H, D) packed tensors, cumulative lengths."""
    outs = []
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    return torch.cat(outs), q.new_zeros(q.shape[1], q.shape[0])


@torch.library.custom_op("dcdit_test::varlen_attention_backward", mutates_args=())
def _standin_varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             softmax_lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                             max_seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)  # only the count matters here


def _standin_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _standin_varlen_backward(grad_out, q, k, v, out, lse, torch.empty_like(q), torch.empty_like(k),
                                          torch.empty_like(v), cu_q, cu_k, ctx.max_q, ctx.max_k)
    return dq, dk, dv, None, None, None, None


def _standin_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.max_q, ctx.max_k = max_q, max_k


_standin_varlen_forward.register_autograd(_standin_backward, setup_context=_standin_setup)


def test_varlen_attention_is_counted_through_torchs_flop_registration():
    register_varlen_attention_flops(torch.ops.dcdit_test.varlen_attention_forward,
                                    torch.ops.dcdit_test.varlen_attention_backward)
    lengths, heads, head_dim = [3, 5, 7], 2, 8
    cu = torch.tensor([0, 3, 8, 15], dtype=torch.int32)
    q, k, v = (torch.randn(15, heads, head_dim, requires_grad=True) for _ in range(3))
    with flop_counter() as counter:
        out, _ = torch.ops.dcdit_test.varlen_attention_forward(q, k, v, cu, cu, 7, 7)
        out.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    scores = heads * sum(n * n for n in lengths)  # H * sum_b L_b^2 = 166, never the padded B * H * 7^2 = 294
    assert counts[torch.ops.dcdit_test.varlen_attention_forward] == scores * 4 * head_dim  # QK^T and AV
    # torch's SDPA backward convention: scores recomputed, dP, dV, dQ, dK: 10 d_head FLOPs per score.
    assert counts[torch.ops.dcdit_test.varlen_attention_backward] == scores * 10 * head_dim


def test_sampling_tflops():
    assert sampling_tflops(118.64, 250) == pytest.approx(59.32)
    assert sampling_tflops(118.64, 250, cfg=True) == pytest.approx(118.64)


def test_param_matched_baselines_reproduce_v1_parameter_counts():
    b = param_matched_dit(preset("DC-DiT-B"))
    xl = param_matched_dit(preset("DC-DiT-XL"))
    assert (b.depth, b.hidden_size, b.patch_size) == (13, 768, 2)
    assert (xl.depth, xl.hidden_size) == (29, 1152)
    assert dit_params(b) / 1e6 == pytest.approx(141, abs=0.5)
    assert dit_params(xl) / 1e6 == pytest.approx(699, abs=0.5)


@pytest.mark.parametrize("name,n,patch", [("DC-DiT-S", 4, 2), ("DC-DiT-B", 4, 2), ("DC-DiT-B", 16, 4),
                                          ("DC-DiT-XL", 16, 4)])
def test_flop_matched_baseline_is_the_closest_depth(name, n, patch):
    config = preset(name, downsample_factor=float(n))
    target = forward_macs(config).total
    matched = flop_matched_dit(config, patch)
    assert matched.patch_size == patch and matched.hidden_size == config.hidden_size
    error = abs(dit_macs(matched).total - target)
    for depth in (matched.depth - 1, matched.depth + 1):
        assert error <= abs(dit_macs(matched.replace(depth=depth)).total - target)


def test_widen_rule_keeps_depth_and_a_valid_width():
    config = preset("DC-DiT-B")
    wide = param_matched_dit(config, rule="widen")
    assert wide.depth == 12 and wide.num_heads == 12
    assert wide.hidden_size % 4 == 0 and (wide.hidden_size // 12) % 2 == 0
    assert abs(dit_params(wide) - count_params(config)) < abs(dit_params(wide.replace(hidden_size=768))
                                                              - count_params(config))
