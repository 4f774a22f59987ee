"""DiT and DC-DiT as whole models: presets, configs, routing, packing and learning."""

import math

import pytest
import torch

import dcdit
from dcdit.config import ModelConfig, from_dict, preset
from dcdit.diffusion import create_diffusion
from dcdit.errors import DCDiTError
from dcdit.models.dit import grid_sincos
from dcdit.objective import ChunkingLossConfig, TrainingObjective


def tiny(name="DC-DiT-S", **overrides):
    base = dict(depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10)
    return dcdit.create_model(name, **{**base, **overrides})


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its initial value so zero-initialised paths carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("name,paper_millions", [("DC-DiT-S", 34.7), ("DC-DiT-B", 137.0), ("DC-DiT-L", 469.0),
                                                 ("DC-DiT-XL", 689.0)])
def test_dcdit_presets_match_the_papers_parameter_counts(name, paper_millions):
    with torch.device("meta"):
        model = dcdit.create_model(name, input_size=32)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params / paper_millions - 1) < 0.02


@pytest.mark.parametrize("name,paper_millions", [("DiT-S/2", 33.0), ("DiT-B/2", 130.0), ("DiT-L/2", 458.0),
                                                 ("DiT-XL/2", 675.0)])
def test_dit_presets_match_the_dit_papers_parameter_counts(name, paper_millions):
    with torch.device("meta"):
        model = dcdit.create_model(name, input_size=32)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 / paper_millions - 1) < 0.01


def test_config_rejects_unknown_keys_with_a_suggestion_and_bad_values():
    with pytest.raises(DCDiTError, match=r"model\.downsample_factr.*did you mean 'downsample_factor'"):
        preset("DC-DiT-S", downsample_factr=4)
    with pytest.raises(DCDiTError, match="did you mean 'DiT-B/2'"):
        preset("DiT-B2")
    with pytest.raises(DCDiTError, match="must be an integer"):
        preset("DiT-S/2", depth="12")
    with pytest.raises(DCDiTError, match="must be > 1"):
        preset("DC-DiT-S", downsample_factor=1)
    with pytest.raises(DCDiTError, match="must divide input_size"):
        preset("DiT-S/4", input_size=30)
    with pytest.raises(DCDiTError, match="must be one of"):
        from_dict(ModelConfig, {**preset("DC-DiT-S").__dict__, "router": "cosin"})


def test_dit_predicts_the_input_shape_with_learned_sigma_channels():
    model = tiny("DiT-S/2").eval()
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 8, 8, 8)


def test_routing_is_available_without_changing_the_prediction():
    model = perturb(tiny()).eval()
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([3, 300, 600, 900]), torch.tensor([1, 2, 3, 4])
    plain = model(x, t, y)
    out, routing = model(x, t, y, return_routing=True)
    assert torch.equal(plain, out)
    assert routing.probs.shape == (4, 64) and routing.mask.shape == (4, 64)
    assert torch.equal(routing.kept, routing.mask.sum(1))
    assert bool(routing.mask[:, 0].all() and routing.mask[:, -1].all())  # first and last are forced


def test_packed_batch_equals_each_sample_alone():
    torch.manual_seed(0)
    model = perturb(tiny(), scale=0.2).eval()
    gen = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(5, 4, 8, 8, generator=gen), torch.tensor([1, 200, 400, 700, 999]), torch.arange(5)
    batch, routing = model(x, t, y, return_routing=True)
    assert len(set(routing.kept.tolist())) > 1, "the test needs samples of different lengths"
    scale = batch.abs().max().item()  # float32 rounding of batched vs single-sample convolutions grows with it
    for b in range(5):
        alone = model(x[b:b + 1], t[b:b + 1], y[b:b + 1])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-4, atol=1e-5 * scale)


def test_kept_tokens_get_positions_of_their_original_grid_coordinates():
    table = grid_sincos(8, 3, 5)
    row, col = 2, 3
    omega = [1 / 10000 ** (i / 2) for i in range(2)]
    expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
    torch.testing.assert_close(table[row * 5 + col], torch.tensor(expected), rtol=0, atol=1e-6)


def test_router_and_dechunk_stay_float32_under_bf16_autocast():
    model = perturb(tiny())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, routing = model(x, t, y, return_routing=True)
    assert routing.probs.dtype == torch.float32
    reference_out, reference = model(x, t, y, return_routing=True)
    # The encoder runs in bf16, so p differs slightly, but the router arithmetic itself is float32.
    assert (routing.probs - reference.probs).abs().max() < 0.05
    # The backbone and the final layer ran in bf16; with the same tokens kept, the prediction is the float32 one
    # to bf16 precision (8 mantissa bits: 2^-8 relative per operation, a few percent after the blocks).
    assert out.dtype == torch.bfloat16 and torch.equal(routing.mask, reference.mask)
    assert (out.float() - reference_out).abs().max() < 0.05 * reference_out.abs().max()


def _block_stream_dtypes(model: torch.nn.Module) -> dict:
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(entering=args[0].dtype))
    model.blocks[-1].register_forward_hook(lambda module, args, out: seen.update(leaving=out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 1]))
    return seen


def test_backbone_residual_stream_has_the_dit_baselines_dtype_under_bf16_autocast():
    dcdit_dtypes = _block_stream_dtypes(perturb(tiny()))
    dit_dtypes = _block_stream_dtypes(perturb(tiny("DiT-S/2")))
    assert dcdit_dtypes == dit_dtypes
    assert dit_dtypes == {"entering": torch.float32, "leaving": torch.float32}  # the fp32 table promotes it


def test_the_inner_dit_stack_ends_in_an_rmsnorm_before_dechunking():
    model = perturb(tiny()).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 800]), torch.tensor([0, 1, 2])
    reference = model(x, t, y)
    # Scaling the last block's output changes nothing downstream when an RMSNorm follows it.
    handle = model.blocks[-1].register_forward_hook(lambda module, args, out: out * 7.0)
    torch.testing.assert_close(model(x, t, y), reference, rtol=1e-4, atol=1e-5)
    handle.remove()
    captured = {}
    model.blocks[-1].register_forward_hook(lambda module, args, out: captured.update(blocks=out))
    model.backbone_norm.register_forward_hook(lambda module, args, out: captured.update(normed=out))
    model(x, t, y)
    h = captured["blocks"].double()
    expected = h / torch.sqrt(h.square().mean(-1, keepdim=True) + 1e-5) * model.backbone_norm.weight.double()
    torch.testing.assert_close(captured["normed"].double(), expected, rtol=1e-5, atol=1e-6)


def test_initialisation_follows_the_release():
    torch.manual_seed(0)
    model = tiny(hidden_size=128, scaffold_width=64)
    d = 128
    bounds = {
        # xavier on every linear, the residual projection included (it starts open, not at zero)
        "residual_proj.weight": math.sqrt(6 / (d + d)),
        # the patch-1 embed conv xavier-initialised as a (out, in * 3 * 3) linear
        "x_embedder.weight": math.sqrt(6 / (4 * 9 + 64)),
        # PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), kept in the ResBlocks
        "encoder.0.conv2.weight": 1 / math.sqrt(64 * 9),
        "decoder.1.conv2.weight": 1 / math.sqrt(64 * 9),
    }
    params = dict(model.named_parameters())
    for name, bound in bounds.items():
        w = params[name].abs().max().item()
        assert 0.9 * bound < w <= bound + 1e-7, (name, w, bound)
    assert not params["x_embedder.bias"].any()
    for norm in (model.encoder_norm, model.backbone_norm, model.decoder_norm):
        assert norm.eps == 1e-5
    # sigmoid(bias) = 1/N: -log(3) = -1.0986 at N = 4, the release's fixed -1.1
    assert model.router.scorer[-1].bias.item() == pytest.approx(-math.log(3.0))
    assert tiny(downsample_factor=16).router.scorer[-1].bias.item() == pytest.approx(-math.log(15.0))


def test_tail_drop_and_lite_cfg_style_per_sample_budgets_reduce_kept_tokens():
    torch.manual_seed(2)  # a batch whose last sample keeps 10 tokens: 0.9 * 10 is an integer
    model = perturb(tiny(), scale=0.3).eval()
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 500), torch.arange(4)
    _, full = model(x, t, y, return_routing=True)
    _, dropped = model(x, t, y, tail_drop=torch.tensor([0.0, 0.0, 0.9, 0.9]), return_routing=True)
    assert torch.equal(full.router_mask, dropped.router_mask)
    assert torch.equal(dropped.kept[:2], full.kept[:2])
    expected = full.kept[2:] - torch.floor(0.9 * full.kept[2:].double() + 1e-9).long()
    assert torch.equal(dropped.kept[2:], expected)


def test_a_tiny_dcdit_overfits_a_few_images_and_its_kept_fraction_moves_to_one_over_n():
    torch.manual_seed(0)
    n_target = 4.0
    model = tiny(downsample_factor=n_target, class_dropout_prob=0.0)
    diffusion = create_diffusion(num_timesteps=1000)
    objective = TrainingObjective(diffusion, routed=True, downsample_factor=n_target, class_dropout_prob=0.0,
                                  chunking=ChunkingLossConfig(ratio_loss_weight=0.3, ratio_group_size=8))
    gen = torch.Generator().manual_seed(1)
    images = torch.zeros(8, 4, 8, 8)
    images[:, :, 2:6, 2:6] = torch.randn(8, 4, 4, 4, generator=gen)  # detail in the centre, flat elsewhere
    labels = torch.arange(8) % 10
    fixed_t = torch.linspace(50, 950, 8).long()
    fixed_noise = torch.randn(images.shape, generator=gen)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            xt = diffusion.q_sample(images, fixed_t, fixed_noise)
            out, routing = model(xt, fixed_t, labels, return_routing=True)
            loss = diffusion.training_losses(out, images, xt, fixed_t, fixed_noise)["mse"].mean().item()
        model.train()
        return loss, routing.router_mask.float().mean().item()

    loss_before, kept_before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0)
    for step in range(250):
        result = objective(model, images, labels, step)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
    loss_after, kept_after = eval_loss()
    assert loss_after < loss_before / 3, (loss_before, loss_after)
    # The router starts at p ~ 1/N just below 0.5: almost nothing is kept. The ratio loss pulls it to 1/N.
    assert abs(kept_after - 1 / n_target) < abs(kept_before - 1 / n_target)
    assert abs(kept_after - 1 / n_target) < 0.12, kept_after
