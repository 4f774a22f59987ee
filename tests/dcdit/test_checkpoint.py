"""The checkpoint contract: exact round trips, a manifest written last that every load checks, corrupt and
half-written checkpoints refused or skipped, pickled code refused, and RNG states that resume the same draws."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.checkpoint import (MANIFEST, capture_rng_state, checkpoint_dir, config_hash, find_latest_checkpoint,
                              is_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint)
from dcdit.errors import DCDiTError


class Tied(nn.Module):
    """Tied input/output embeddings: two state-dict entries share one storage, which safetensors refuses."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.body = nn.Linear(5, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("stats", torch.randn(3, 4).to(torch.bfloat16))


def parts():
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.body(model.embed(torch.tensor([1, 2]))).square().sum().backward()
    opt.step()
    model_state = dict(model.state_dict())
    model_state["transposed"] = torch.arange(12.0).view(3, 4).t()  # a non-contiguous view
    model_state["row"] = model_state["body.weight"][1]  # a view into another entry's storage
    ema_state = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    state = {"step": 1234, "data": {"epoch": 3, "cursor": 77}, "rng": capture_rng_state(),
             "config_hash": config_hash({"b": 1, "a": [1, 2]}), "loss": 0.25}
    return model, opt, model_state, ema_state, state


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.fixture()
def saved(tmp_path):
    model, opt, model_state, ema_state, state = parts()
    path = save_checkpoint(tmp_path / "checkpoint_00001234", model_state=model_state, ema_state=ema_state,
                           optimizer_state=opt.state_dict(), state=state, config={"model": {"depth": 2}})
    return path, model, opt, model_state, ema_state, state


def test_round_trip_is_exact(saved):
    path, model, opt, model_state, ema_state, state = saved
    ckpt = load_checkpoint(path)
    assert_same(ckpt.model_state, {k: v.contiguous() for k, v in model_state.items()})
    assert_same(ckpt.ema_state, ema_state)
    assert_same(ckpt.optimizer_state, opt.state_dict())
    assert ckpt.state == json.loads(json.dumps(state)) and ckpt.step == 1234
    assert ckpt.config == {"model": {"depth": 2}}
    assert ckpt.model_state["stats"].dtype == torch.bfloat16
    # The loaded states drive real objects.
    fresh = Tied()
    fresh.load_state_dict({k: v for k, v in ckpt.model_state.items() if k not in ("transposed", "row")})
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(ckpt.optimizer_state)
    assert fresh_opt.param_groups[0]["weight_decay"] == 0.01
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json",
                                      "config.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_optional_parts_and_overwrite(saved):
    path = saved[0]
    save_checkpoint(path, model_state={"w": torch.ones(2)}, state={"step": 5})
    ckpt = load_checkpoint(path)
    assert ckpt.ema_state is None and ckpt.optimizer_state is None and ckpt.config is None
    assert ckpt.step == 5 and torch.equal(ckpt.model_state["w"], torch.ones(2))
    assert not (path / "ema.safetensors").exists()  # stale files of the earlier save are gone


def test_truncated_file_is_named(saved):
    path = saved[0]
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(DCDiTError, match=r"corrupt: model\.safetensors has \d+ bytes.*truncated"):
        load_checkpoint(path)
    with pytest.raises(DCDiTError, match=r"model\.safetensors"):
        load_checkpoint(path, verify=False)  # sizes are checked even without hashing


@pytest.mark.parametrize("name", ["ema.safetensors", "optimizer.pt", "state.json"])
def test_flipped_byte_is_named(saved, name):
    path = saved[0]
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(DCDiTError, match=rf"corrupt: {name} fails its sha256 check"):
        load_checkpoint(path)


def test_missing_or_invalid_manifest_is_not_a_checkpoint(saved):
    path = saved[0]
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(DCDiTError, match="incomplete checkpoint.*not a valid"):
        load_checkpoint(path)
    (path / MANIFEST).unlink()
    with pytest.raises(DCDiTError, match="incomplete checkpoint.*MANIFEST.json is missing"):
        load_checkpoint(path)
    assert not is_checkpoint(path)
    with pytest.raises(DCDiTError, match="no checkpoint"):
        load_checkpoint(path.parent / "nothing_here")


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_in_optimizer_is_refused(saved, capsys):
    path = saved[0]
    torch.save({"state": {}, "param_groups": [], "evil": Payload()}, path / "optimizer.pt")
    manifest = json.loads((path / MANIFEST).read_text())
    data = (path / "optimizer.pt").read_bytes()  # a consistent manifest: the checksums do not save us here
    manifest["files"]["optimizer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DCDiTError, match=r"refusing to load .*optimizer\.pt: it contains pickled code"):
        load_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_save_refuses_what_cannot_be_read_back(tmp_path):
    with pytest.raises(DCDiTError, match="JSON"):
        save_checkpoint(tmp_path / "a", model_state={"w": torch.ones(1)}, state={"t": torch.ones(1)})
    with pytest.raises(DCDiTError, match=r"optimizer_state\['extra'\] is a Payload"):
        save_checkpoint(tmp_path / "a", model_state={"w": torch.ones(1)}, optimizer_state={"extra": Payload()},
                        state={})
    assert not (tmp_path / "a").exists()  # validated before anything was written


def test_find_latest_skips_incomplete(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40):
        save_checkpoint(checkpoint_dir(tmp_path, step), model_state={"w": torch.full((64,), float(step))},
                        state={"step": step})
    (tmp_path / "checkpoint_00000040" / MANIFEST).unlink()  # a save that died before its manifest
    weights = tmp_path / "checkpoint_00000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])  # a manifest, but a truncated file
    (tmp_path / "checkpoint_00000099.tmp").mkdir()  # not a checkpoint name
    (tmp_path / "checkpoint_00000050").mkdir()  # half-written: no files at all yet
    latest = find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint_00000020"
    assert load_checkpoint(latest).step == 20


def draws():
    return ([random.random() for _ in range(3)], np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            torch.rand(3).tolist(), torch.randn(2, 2).tolist(), random.gauss(0, 1))


def test_rng_capture_restore_reproduces_draws():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()  # move away from the seeded start, and leave a cached gaussian in numpy and python
    np.random.randn(1)
    random.gauss(0, 1)
    rng = json.loads(json.dumps(capture_rng_state()))  # JSON-able, as it travels in state.json
    expected = draws()
    draws()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(rng)
    assert draws() == expected
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 1, "b": 3})
