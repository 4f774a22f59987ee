"""The shipped experiment files say what the paper (and the CPU-scale study) needs: the router each table was made
with. Loading only: no Ray, no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcdit_platform.config import load_experiment
from dcdit_platform.sweeps.plan import load_sweep

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.mark.parametrize("name", ["imagenet256/sweep-dcdit-b.yaml", "imagenet256/sweep-dcdit-xl.yaml"])
def test_v1_table_sweeps_use_the_cosine_router(name):
    plan = load_sweep(EXPERIMENTS / name, storage="s3://bucket/runs", tracking_uri="https://mlflow.example.com")
    routed = [t for t in plan.trials if t.config.model.arch == "dcdit"]
    assert routed and {t.config.model.router for t in routed} == {"cosine"}


def test_v1_runs_use_the_cosine_router_and_the_v2_run_the_predictability_router():
    assert load_experiment(EXPERIMENTS / "imagenet256/dcdit-b-n16.yaml").model.router == "cosine"
    upcycle = load_experiment(EXPERIMENTS / "upcycle-xl-n4.yaml").model
    assert (upcycle.router, upcycle.position_patch_size) == ("cosine", 2)  # v1; the DiT-XL/2 teacher's frame
    assert load_experiment(EXPERIMENTS / "imagenet256/dcdit-b-n4.yaml").model.router == "predictability"
