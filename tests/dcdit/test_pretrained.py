"""load_dit against diffusers' own DiTTransformer2DModel: the diffusers directory, the official .pt and
.safetensors formats (converted by a mapping written here, independently of dcdit.pretrained), refusal of
pickled code, and the errors for missing files and hub names while offline."""

from __future__ import annotations

import argparse
import re

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from dcdit.errors import DCDiTError
from dcdit.pretrained import load_dit

HEADS, HEAD_DIM, DEPTH, SIDE, PATCH, CLASSES = 2, 16, 2, 8, 2, 10


@pytest.fixture(scope="module")
def transformer():
    """A tiny DiTTransformer2DModel with every weight random (adaLN-Zero's zeros included), in eval mode.

    Two settings make diffusers compute what the original DiT computes, which our DiT reproduces: norm_eps=1e-6
    (the original's LayerNorm eps) and downscale_freq_shift=0 on the timestep features (diffusers divides the
    frequency exponent by half - 1, the original by half). Neither changes any weight.
    """
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=DEPTH,
        sample_size=SIDE, patch_size=PATCH, num_embeds_ada_norm=CLASSES, norm_eps=1e-6)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        # Converted DiT checkpoints hold the one DiT embedder copied into every block.
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, SIDE, SIDE, generator=gen)
    t = torch.tensor([0, 421, 999])
    y = torch.tensor([0, 7, CLASSES])  # CLASSES is the CFG null class
    return x, t, y


@pytest.fixture(scope="module")
def reference(transformer, inputs):
    x, t, y = inputs
    with torch.no_grad():
        out = transformer(x, timestep=t, class_labels=y).sample
    assert out.shape == (3, 8, SIDE, SIDE) and out.std() > 0.1  # a real function of the input, not zeros
    return out


def ours(model, inputs):
    x, t, y = inputs
    with torch.no_grad():
        return model(x, t, y)


def official_state_dict(diffusers_state: dict, pos_embed: torch.Tensor) -> dict:
    """The official DiT names, written out per tensor (independent of dcdit.pretrained's tables)."""
    out = {"pos_embed": pos_embed.clone()}
    emb = "transformer_blocks.0.norm1.emb."
    for kind in ("weight", "bias"):
        out[f"x_embedder.proj.{kind}"] = diffusers_state[f"pos_embed.proj.{kind}"]
        out[f"t_embedder.mlp.0.{kind}"] = diffusers_state[f"{emb}timestep_embedder.linear_1.{kind}"]
        out[f"t_embedder.mlp.2.{kind}"] = diffusers_state[f"{emb}timestep_embedder.linear_2.{kind}"]
        out[f"final_layer.adaLN_modulation.1.{kind}"] = diffusers_state[f"proj_out_1.{kind}"]
        out[f"final_layer.linear.{kind}"] = diffusers_state[f"proj_out_2.{kind}"]
    out["y_embedder.embedding_table.weight"] = diffusers_state[f"{emb}class_embedder.embedding_table.weight"]
    for key, value in diffusers_state.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m or ".emb." in key:
            continue
        i, name, kind = m.groups()
        if name == "attn1.to_q":
            qkv = [diffusers_state[f"transformer_blocks.{i}.attn1.to_{c}.{kind}"] for c in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv)
        elif name in ("attn1.to_k", "attn1.to_v"):
            continue
        else:
            target = {"attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
                      "norm1.linear": "adaLN_modulation.1"}[name]
            out[f"blocks.{i}.{target}.{kind}"] = value
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def official(transformer):
    return official_state_dict(transformer.state_dict(), transformer.pos_embed.pos_embed)


def test_diffusers_directory_matches_diffusers(transformer, inputs, reference, tmp_path):
    transformer.save_pretrained(tmp_path / "dit")
    model = load_dit(tmp_path / "dit")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.patch_size, cfg.input_size, cfg.num_classes,
            cfg.learn_sigma) == (HEADS * HEAD_DIM, HEADS, DEPTH, PATCH, SIDE, CLASSES, True)
    assert not model.training
    torch.testing.assert_close(ours(model, inputs), reference, rtol=1e-5, atol=1e-5)


def test_pipeline_directory_with_transformer_subfolder(transformer, inputs, reference, tmp_path):
    transformer.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=False)  # the .bin variant
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    torch.testing.assert_close(ours(load_dit(tmp_path / "pipe"), inputs), reference, rtol=1e-5, atol=1e-5)


def test_official_pt_matches_diffusers(official, inputs, reference, tmp_path):
    torch.save(official, tmp_path / "dit.pt")
    model = load_dit(tmp_path / "dit.pt", num_heads=HEADS)  # width 32 is no preset, so heads must be given
    torch.testing.assert_close(ours(model, inputs), reference, rtol=1e-5, atol=1e-5)


def test_official_safetensors_matches_diffusers(official, inputs, reference, tmp_path):
    save_file(official, str(tmp_path / "dit.safetensors"))
    model = load_dit(tmp_path / "dit.safetensors", num_heads=HEADS)
    torch.testing.assert_close(ours(model, inputs), reference, rtol=1e-5, atol=1e-5)


def test_training_checkpoint_prefers_ema(official, inputs, reference, tmp_path):
    raw = {k: v + 1.0 for k, v in official.items()}  # the non-EMA weights differ
    ckpt = {"model": {f"module.{k}": v for k, v in raw.items()}, "ema": official, "opt": {"state": {}},
            "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4)}
    torch.save(ckpt, tmp_path / "0050000.pt")
    model = load_dit(tmp_path / "0050000.pt", num_heads=HEADS)
    torch.testing.assert_close(ours(model, inputs), reference, rtol=1e-5, atol=1e-5)
    # Without EMA, the model weights are taken (and the DDP prefix stripped).
    torch.save({"model": ckpt["model"]}, tmp_path / "model_only.pt")
    model = load_dit(tmp_path / "model_only.pt", num_heads=HEADS)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, raw["blocks.0.attn.qkv.weight"])


def test_heads_from_preset_width(tmp_path):
    from dcdit.models import create_model

    with torch.device("meta"):
        width = create_model("DiT-S/2", depth=1, input_size=8, num_classes=3)
    state = {k: torch.zeros(v.shape) for k, v in width.state_dict().items()}
    save_file(state, str(tmp_path / "s.safetensors"))
    model = load_dit(tmp_path / "s.safetensors")
    assert (model.config.num_heads, model.config.hidden_size, model.config.num_classes) == (6, 384, 3)
    with pytest.raises(DCDiTError, match="num_heads"):
        load_dit(tmp_path / "s.safetensors", num_heads=5)  # 384 is not divisible by 5


def test_unknown_width_needs_num_heads(official, tmp_path):
    torch.save(official, tmp_path / "dit.pt")
    with pytest.raises(DCDiTError, match="num_heads="):
        load_dit(tmp_path / "dit.pt")


def _saved_config(transformer, tmp_path) -> str:
    transformer.save_pretrained(tmp_path / "cfg")
    return (tmp_path / "cfg" / "config.json").read_text()


def test_untied_block_embedders_are_refused(transformer, tmp_path):
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    state["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"] += 1.0
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(_saved_config(transformer, tmp_path))
    save_file(state, str(tmp_path / "d" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(DCDiTError, match=r"transformer_blocks\.1\.norm1\.emb.*differs"):
        load_dit(tmp_path / "d")


MARKER: list[str] = []


def _record(value):
    MARKER.append(value)
    return value


class Payload:
    """Unpickling this runs `_record`: what an attacker's checkpoint would do."""

    def __reduce__(self):
        return (_record, ("code ran",))


def test_pickled_code_is_refused_and_not_run(official, tmp_path):
    torch.save({**official, "extra": Payload()}, tmp_path / "evil.pt")
    MARKER.clear()
    with pytest.raises(DCDiTError, match="refusing to load .*pickled code.*safetensors"):
        load_dit(tmp_path / "evil.pt", num_heads=HEADS)
    assert MARKER == []
    # The payload is real: an unrestricted load would have run it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert MARKER == ["code ran"]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DCDiTError, match="no such file or directory: .*nope.pt"):
        load_dit(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(DCDiTError, match="cannot read"):
        load_dit(tmp_path / "junk.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DCDiTError, match="no config.json"):
        load_dit(tmp_path / "empty")


def test_hub_repo_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DCDiTError, match=r"dcdit-test/no-such-dit.*hf download dcdit-test/no-such-dit"):
        load_dit("dcdit-test/no-such-dit", cache_dir=tmp_path / "hf")


def test_official_name_offline_says_url_and_place(official, inputs, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    dest = tmp_path / "torch" / "hub" / "checkpoints" / "DiT-XL-2-256x256.pt"
    with pytest.raises(DCDiTError) as err:
        load_dit("DiT-XL-2-256x256.pt")
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in str(err.value)
    assert str(dest) in str(err.value)
    # Once the file is where the message says, the same name loads it.
    dest.parent.mkdir(parents=True)
    torch.save(official, dest)
    model = load_dit("DiT-XL-2-256x256.pt", num_heads=HEADS)
    torch.testing.assert_close(ours(model, inputs), reference, rtol=1e-5, atol=1e-5)
