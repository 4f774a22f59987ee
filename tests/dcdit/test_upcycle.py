"""upcycle: which tensors are copied, which are new, what is skipped, and that the copied backbone computes
exactly what the DiT's did; targets that do not fit are refused with the tensors named. BlockDistiller: the
warm-up loss is the MSE of the student's blocks against the teacher's blocks on the same inputs."""

from __future__ import annotations

import pytest
import torch

from dcdit.config import ModelConfig, preset
from dcdit.errors import DCDiTError
from dcdit.models import DCDiT, DiT
from dcdit.models.attention import Packing
from dcdit.upcycle import BlockDistiller, freeze_embedders, upcycle

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
    return ModelConfig(arch="dcdit", **{**TINY, **changes})


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


def _student_forward(student, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    return student(x, torch.tensor([5, 400, 900]), torch.tensor([0, 3, 7]))


def test_distill_loss_is_the_mse_against_the_teacher_blocks_on_the_captured_inputs(dit):
    student = upcycle(dit, target()).model.eval()
    teacher = _perturbed(DiT(ModelConfig(arch="dit", patch_size=2, **TINY)), seed=9).eval().requires_grad_(False)
    seen: dict = {"outputs": []}  # our own record of what the student's blocks received and returned
    hooks = [student.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(inputs=args))]
    hooks += [b.register_forward_hook(lambda m, args, out: seen["outputs"].append(out.detach()))
              for b in student.blocks]
    distiller = BlockDistiller(student, teacher)
    _student_forward(student)
    loss = distiller.loss()
    for hook in hooks:
        hook.remove()

    tokens, cond, packing = seen["inputs"]
    expected, x = [], tokens
    with torch.no_grad():
        for block, out in zip(teacher.blocks, seen["outputs"]):
            x = block(x, cond, packing)
            expected.append(((out.float() - x.float()) ** 2).mean())
    assert len(expected) == len(student.blocks) == 2
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-6, atol=0)
    assert float(loss.detach()) > 1e-4  # a different teacher: the loss is not trivially zero
    assert loss.requires_grad  # it trains the student's blocks (the teacher's side is constant)


def test_distill_loss_is_zero_when_the_student_blocks_are_the_teacher(dit):
    student = upcycle(dit, target()).model.eval()  # its blocks are copies of the DiT's
    distiller = BlockDistiller(student, dit)
    _student_forward(student)
    assert float(distiller.loss()) == 0.0


def test_distiller_needs_a_forward_first_and_stops_capturing_once_closed(dit):
    student = upcycle(dit, target()).model.eval()
    distiller = BlockDistiller(student, dit)
    with pytest.raises(RuntimeError, match="forward pass first"):
        distiller.loss()
    _student_forward(student)
    distiller.loss()
    with pytest.raises(RuntimeError, match="forward pass first"):  # each forward's capture is used once
        distiller.loss()
    distiller.close()
    _student_forward(student)
    assert distiller.inputs is None and distiller.outputs == []
    with pytest.raises(DCDiTError, match="the teacher has 2 blocks, the student 3"):
        BlockDistiller(DCDiT(target(depth=3)), dit)
