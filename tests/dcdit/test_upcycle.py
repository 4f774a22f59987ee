"""upcycle: which tensors are copied, which are new, what is skipped, and that the copied backbone computes
exactly what the DiT's did, with kept tokens in the DiT's position frame; targets that do not fit are refused with
the tensors named. BlockDistiller: the teacher runs on the same x_t at its own patch size, and each kept student
token is matched to the teacher's output at the patch containing it."""

from __future__ import annotations

import math

import pytest
import torch

from dcdit.config import ModelConfig, preset
from dcdit.errors import DCDiTError
from dcdit.models import DCDiT, DiT
from dcdit.models.attention import Packing
from dcdit.distill import BlockDistiller
from dcdit.upcycle import freeze_embedders, upcycle

TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=10)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = DiT(ModelConfig(arch="dit", patch_size=2, **TINY))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adaLN-Zero starts blocks at the identity; make them compute something
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def target(**changes) -> ModelConfig:
    return ModelConfig(arch="dcdit", **{**TINY, "position_patch_size": 2, **changes})


def test_copied_equal_source_and_every_tensor_is_accounted_for(dit):
    result = upcycle(dit, target())
    model, source = result.model, dit.state_dict()
    state = model.state_dict()
    assert isinstance(model, DCDiT)
    assert result.copied and set(result.copied).isdisjoint(result.new)
    assert set(result.copied) | set(result.new) == set(state)
    assert {n for n, _ in model.named_parameters()} <= set(result.copied) | set(result.new)
    for name in result.copied:
        assert name.startswith(("t_embedder.", "y_embedder.", "blocks.")), name
        assert torch.equal(state[name], source[name]), name
    copied_prefixes = {name.split(".")[0] for name in result.copied}
    assert copied_prefixes == {"t_embedder", "y_embedder", "blocks"}
    assert len([n for n in result.copied if n.startswith("blocks.")]) == len(
        [n for n in source if n.startswith("blocks.")])
    new_prefixes = {name.split(".")[0] for name in result.new}
    assert {"x_embedder", "encoder", "router", "residual_proj", "decoder", "final_layer"} <= new_prefixes
    assert set(result.skipped) == {n for n in source if n.split(".")[0] in ("pos_embed", "x_embedder", "final_layer")}
    assert "copied" in result.summary() and "router" in result.summary()
    # A copy, not an alias: training the DC-DiT must not move the pretrained DiT.
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, dit.blocks[0].attn.qkv.weight)


def test_upcycled_blocks_compute_what_the_dit_computed(dit):
    model = upcycle(dit, target()).model.eval()
    gen = torch.Generator().manual_seed(3)
    t, y = torch.tensor([5, 500, 990]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        c_dit, c_up = dit.condition(t, y), model.condition(t, y)
        torch.testing.assert_close(c_up, c_dit, rtol=0, atol=0)
        tokens = torch.randn(3 * 7, 32, generator=gen)
        packing = Packing.uniform(3, 7)
        expected = dit.run_blocks(tokens, c_dit, packing)
        assert not torch.allclose(expected, tokens, atol=1e-3)  # the blocks are not the identity
        torch.testing.assert_close(model.run_blocks(tokens, c_up, packing), expected, rtol=0, atol=0)
        x = torch.randn(3, 4, 8, 8, generator=gen)
        out, routing = model(x, t, y, return_routing=True)
    assert out.shape == (3, 8, 8, 8) and torch.isfinite(out).all()
    assert routing.probs.shape == (3, 64)


def test_preset_target_takes_data_fields_from_the_dit(dit):
    result = upcycle(dit, "DC-DiT-S", depth=2, hidden_size=32, num_heads=2, downsample_factor=16.0)
    cfg = result.model.config
    assert (cfg.input_size, cfg.num_classes, cfg.in_channels, cfg.learn_sigma) == (8, 10, 4, True)
    assert cfg.downsample_factor == 16.0 and cfg.cond_adaptor is False
    assert upcycle(dit, None).model.config.hidden_size == 32  # None: the DiT's own size


def test_mismatching_preset_lists_the_tensors():
    with torch.device("meta"):  # shapes are all that is compared, so no real S-sized weights are needed
        small = DiT(preset("DiT-S/2"))
    with pytest.raises(DCDiTError) as err:
        upcycle(small, "DC-DiT-B")
    message = str(err.value)
    assert "blocks.0.attn.qkv.weight DiT (1152, 384) vs DC-DiT (2304, 768)" in message
    assert "t_embedder.mlp.0.weight DiT (384, 256) vs DC-DiT (768, 256)" in message
    assert "more" in message and "\n" not in message
    assert "target='DC-DiT-S'" in message  # the fix: the DC-DiT preset of the DiT's size


def test_depth_mismatch_names_missing_blocks(dit):
    with pytest.raises(DCDiTError, match=r"blocks\.2\.attn\.qkv\.weight \(96, 32\) \(not in the DiT\)"):
        upcycle(dit, target(depth=3))
    with pytest.raises(DCDiTError, match=r"blocks\.1\.mlp\.fc1\.weight \(128, 32\) \(not in the DC-DiT\)"):
        upcycle(dit, target(depth=1))


def test_a_dit_target_is_refused(dit):
    with pytest.raises(DCDiTError, match="upcycle target has arch='dit'; upcycling builds a DC-DiT"):
        upcycle(dit, ModelConfig(arch="dit", patch_size=2, **TINY))


def test_heads_mismatch_is_refused_though_shapes_agree(dit):
    with pytest.raises(DCDiTError, match="num_heads=2"):
        upcycle(dit, target(num_heads=4))


def test_cond_adaptor_and_freezing(dit):
    result = upcycle(dit, target(), cond_adaptor=True)
    model = result.model
    assert isinstance(model.cond_adaptor, torch.nn.LayerNorm)
    assert {"cond_adaptor.weight", "cond_adaptor.bias"} <= set(result.new)
    frozen = freeze_embedders(model)
    assert frozen and all(n.startswith(("t_embedder.", "y_embedder.")) for n in frozen)
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(("t_embedder.", "y_embedder."))), name
    # The adaptor changes what the scaffold sees, and it trains.
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 1])
    model(x, t, y).square().mean().backward()
    assert model.cond_adaptor.weight.grad is not None
    assert model.t_embedder.mlp[0].weight.grad is None


def test_upcycle_from_a_path(dit, tmp_path):
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    result = upcycle(tmp_path / "dit.pt", target())  # the heads of a plain state dict come from the target
    source = dit.state_dict()
    assert all(torch.equal(result.model.state_dict()[k], source[k]) for k in result.copied)


def _perturbed(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def test_kept_tokens_get_positions_in_the_dits_coordinate_frame(dit):
    model = upcycle(dit, None).model
    assert model.config.position_patch_size == 2
    # Grid position (r, c) sits at ((r - 0.5) / 2, (c - 0.5) / 2) on the DiT/2's patch grid: a patch's centre is the
    # patch's own coordinate. DiT's layout: sin/cos of the column for the first half, then of the row.
    d, r, c = 32, 3, 6
    row, col = (r - 0.5) / 2, (c - 0.5) / 2
    omega = [1 / 10000 ** (i / (d // 4)) for i in range(d // 4)]
    expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
    torch.testing.assert_close(model.positions(torch.tensor([r * 8 + c]))[0], torch.tensor(expected),
                               rtol=0, atol=1e-6)
    with pytest.raises(DCDiTError, match="set model.position_patch_size=2"):
        upcycle(dit, target(position_patch_size=1))


# A hand-built 4x4 case: a DiT/2 teacher sees 2x2 patches; the student routes over the 16 positions.
CONTAINING_PATCH = {0: 0, 1: 0, 2: 1, 3: 1, 4: 0, 5: 0, 6: 1, 7: 1, 8: 2, 9: 2, 10: 3, 11: 3, 12: 2, 13: 2, 14: 3, 15: 3}
SMALL = dict(depth=2, hidden_size=32, num_heads=2, input_size=4, num_classes=10, class_dropout_prob=0.5)


def _small_pair(router: str = "random"):
    torch.manual_seed(0)
    teacher = _perturbed(DiT(ModelConfig(arch="dit", patch_size=2, **SMALL)), seed=2).eval().requires_grad_(False)
    student = upcycle(teacher, None, router=router, downsample_factor=2.0).model.train()
    return teacher, student


def test_distillation_target_is_the_teachers_block_output_at_the_containing_patch():
    teacher, student = _small_pair()
    distiller = BlockDistiller(student, teacher)
    gen = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(3, 4, 4, 4, generator=gen), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    drop = torch.tensor([0, 1, 0])  # the second sample's label is dropped to the null class (10)
    _, routing = student(x, t, y, force_drop_ids=drop, return_routing=True)
    targets = distiller.targets()

    # The teacher, by hand: its own patch embed and positions on the same x_t, its own embedders on t and the labels
    # the student used; every block's output recorded.
    expected_blocks = []
    hooks = [b.register_forward_hook(lambda m, a, out: expected_blocks.append(out.view(3, 4, -1)))
             for b in teacher.blocks]
    with torch.no_grad():
        teacher(x, t, torch.tensor([1, 10, 3]))
    for hook in hooks:
        hook.remove()
    kept = [(b, pos) for b in range(3) for pos in range(16) if routing.mask[b, pos]]
    assert len({(b, CONTAINING_PATCH[p]) for b, p in kept}) < len(kept), "the case needs two tokens in one patch"
    assert len(targets) == 2
    for block, target_rows in enumerate(targets):
        assert target_rows.shape == (len(kept), 32)
        for row, (b, pos) in enumerate(kept):
            torch.testing.assert_close(target_rows[row], expected_blocks[block][b, CONTAINING_PATCH[pos]],
                                       rtol=0, atol=0)


def test_distill_loss_is_the_mean_block_mse_and_is_not_zero_at_step_0():
    teacher, student = _small_pair(router="predictability")  # a fresh upcycle: its scaffold is untrained
    with torch.no_grad():
        student.router.scorer[-1].bias.fill_(5.0)  # keep every token, so each teacher patch has 4 students
    seen = []
    for block in student.blocks:
        block.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    distiller = BlockDistiller(student, teacher)
    gen = torch.Generator().manual_seed(4)
    x, t, y = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([100, 800]), torch.tensor([5, 6])
    student(x, t, y, force_drop_ids=torch.tensor([0, 0]))
    targets = distiller.targets()
    loss = distiller.loss()
    expected = torch.stack([(out - target).square().mean() for out, target in zip(seen, targets, strict=True)])
    torch.testing.assert_close(loss.detach(), expected.mean(), rtol=1e-6, atol=0)
    # The student's tokens come from its new conv scaffold, the teacher's from its patchify: far apart at step 0
    # (the old target, the teacher's blocks on the student's own tokens, gave exactly 0 here).
    scale = torch.stack([target.square().mean() for target in targets]).mean()
    assert float(loss.detach()) > 0.05 * float(scale)
    assert loss.requires_grad  # it trains the student; the teacher's side is constant
    loss.backward()
    assert student.encoder[0].conv1.weight.grad is not None  # the teacher's signal reaches the new scaffold


def test_distiller_needs_a_forward_first_and_stops_capturing_once_closed():
    teacher, student = _small_pair()
    distiller = BlockDistiller(student, teacher)
    with pytest.raises(RuntimeError, match="forward pass first"):
        distiller.loss()
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([5, 50]), torch.tensor([0, 1])
    student(x, t, y)
    distiller.loss()
    with pytest.raises(RuntimeError, match="forward pass first"):  # each forward's capture is used once
        distiller.loss()
    distiller.close()
    student(x, t, y)
    assert distiller.captured == {} and distiller.outputs == []
    with pytest.raises(DCDiTError, match="the teacher has 2 blocks, the student 3"):
        BlockDistiller(DCDiT(target(depth=3)), teacher)
