"""Fixtures of the sweep tests: the smoke sweep planned into a temporary storage root (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dcdit_platform.sweeps import load_sweep

EXPERIMENTS = Path(__file__).resolve().parents[3] / "experiments"


@pytest.fixture
def smoke_plan(tmp_path):
    """experiments/smoke-sweep.yaml (trials DC-DiT-tiny_N4_lam0.01, DC-DiT-tiny_N4_lam0.1, DiT-tiny_2; 4 steps)."""
    return load_sweep(EXPERIMENTS / "smoke-sweep.yaml", storage=str(tmp_path / "runs"))
