"""dcdit_platform.runs.open_checkpoint, which every evaluation and `dcdit generate` opens weights through: the EMA
weights are the ones sampled from (the fixture's raw model weights differ from them), a run directory means its
latest complete checkpoint, and a checkpoint without EMA falls back to the raw weights with a warning."""

from __future__ import annotations

import pytest
import torch

from dcdit.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from dcdit_platform.runs import open_checkpoint
from helpers.evaluation import tiny_checkpoint


def test_the_ema_weights_are_chosen_over_the_model_weights(tmp_path):
    directory = tiny_checkpoint(tmp_path, step=10)
    stored = load_checkpoint(directory)
    assert stored.ema_state.keys() == stored.model_state.keys()
    gap = max(float((stored.ema_state[k] - stored.model_state[k]).abs().max()) for k in stored.ema_state)
    assert gap > 0.05  # the fixture's raw weights are the EMA plus N(0, 0.05^2) noise
    for uri in (str(directory), str(tmp_path / "tiny")):  # the checkpoint, and the run directory holding it
        loaded = open_checkpoint(uri)
        assert loaded.used_ema and loaded.step == 10 and loaded.weights.keys() == stored.ema_state.keys()
        assert all(torch.equal(loaded.weights[k], stored.ema_state[k]) for k in stored.ema_state)


def test_a_checkpoint_without_ema_is_evaluated_on_its_model_weights_with_a_warning(tmp_path):
    stored = load_checkpoint(tiny_checkpoint(tmp_path, step=10))
    bare = checkpoint_dir(tmp_path / "bare", 10)
    save_checkpoint(bare, model_state=stored.model_state, state=stored.state, config=stored.config)
    with pytest.warns(UserWarning, match="no EMA weights"):
        loaded = open_checkpoint(str(bare))
    assert not loaded.used_ema
    assert all(torch.equal(loaded.weights[k], stored.model_state[k]) for k in stored.model_state)
