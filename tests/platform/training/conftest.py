"""Fixtures of the training tests: the reference run every exactness check compares with."""

from __future__ import annotations

import pytest
from dcdit_platform.config import build_config
from dcdit_platform.training import plan_run, run_local
from helpers.training import load_weights, tiny_config


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The tiny config (helpers.training.tiny_config) trained 12 steps in one process, checkpoints at 4, 8 and 12.

    Its 2 workers x 1 micro-batch become 1 worker x 2, which trains the same thing, so Ray runs of the same config
    must end with these weights. Returns (summary, storage root, {step: (model, ema) state dicts})."""
    store = tmp_path_factory.mktemp("reference")
    summary = run_local(plan_run(build_config(tiny_config(storage={"uri": str(store)})), name="straight"))
    weights = {step: load_weights(store / "straight" / f"checkpoint_{step:08d}") for step in (4, 8, 12)}
    return summary, str(store), weights
