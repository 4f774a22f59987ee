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


# --- the CPU-scale study (experiments/study) -------------------------------------------------------------------------

def _study_plan(tmp_path, **knobs):
    from dcdit_platform.study import default_sweep, write_sweep_copy

    return load_sweep(write_sweep_copy(tmp_path, default_sweep(), **knobs), storage=str(tmp_path / "runs"),
                      tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def test_study_sweep_has_every_setting_at_two_seeds(tmp_path):
    plan = _study_plan(tmp_path, steps=None, seeds=None)
    settings = {}
    for trial in plan.trials:
        m = trial.config.model
        key = (m.arch, m.router if m.arch == "dcdit" else None, m.downsample_factor if m.arch == "dcdit" else None,
               m.patch_size if m.arch == "dit" else None, m.depth)
        settings.setdefault(key, []).append(trial.config.seed)
    assert settings == {("dcdit", "predictability", 4.0, None, 8): [0, 1], ("dcdit", "random", 4.0, None, 8): [0, 1],
                        ("dcdit", "grid", 4.0, None, 8): [0, 1], ("dcdit", "predictability", 16.0, None, 8): [0, 1],
                        ("dit", None, None, 2, 10): [0, 1],  # FLOP-matched to N=4
                        ("dit", None, None, 2, 8): [0, 1], ("dit", None, None, 4, 8): [0, 1]}
    routed = [t.config for t in plan.trials if t.config.model.arch == "dcdit"]
    assert all(c.train.chunking.multi_budget for c in routed)
    # The N=16 baseline spells out the DC-DiT fields: it must be the base model with another N, nothing else.
    base = next(c.model for c in routed if c.model.downsample_factor == 4 and c.model.router == "predictability")
    n16 = next(c.model for c in routed if c.model.downsample_factor == 16)
    assert n16 == base.replace(downsample_factor=16.0)


def test_study_scaffold_is_at_most_a_quarter_of_the_flops_as_its_comments_say(tmp_path):
    from dcdit.flops import dcdit_macs

    model = load_experiment(EXPERIMENTS / "study" / "experiment.yaml").model
    macs = dcdit_macs(model)
    backbone = sum(macs.terms[k] for k in ("qkv", "attention", "proj", "mlp", "adaln", "t_embedder"))
    share = 1 - backbone / macs.total
    assert round(macs.total / 1e6, 1) == 38.9 and round(100 * share, 1) == 24.0 and share <= 0.25


def test_study_upcycled_run_starts_from_its_teacher_in_the_teachers_frame(tmp_path):
    from dcdit_platform.study import default_sweep, load_upcycle_spec, upcycled_config

    plan = _study_plan(tmp_path, steps=400, seeds=None)
    spec = load_upcycle_spec(default_sweep().parent / "upcycle.yaml")
    config = upcycled_config(plan, spec, 1, "/runs/study/DiT-study_2_seed1/checkpoint_00000400", "parent-id")
    student = next(t.config for t in plan.trials if t.name == "DC-DiT-study_router-predictability_seed1")
    assert config.name == "DC-DiT-study_router-predictability_upcycled_seed1" and config.seed == 1
    assert config.train.init_from == "/runs/study/DiT-study_2_seed1/checkpoint_00000400/ema.safetensors"
    assert (config.train.steps, config.train.distill_steps, config.checkpoint.every) == (100, 25, 50)
    assert (config.train.freeze_embedders, config.train.cond_adaptor, config.model.position_patch_size) == \
        (True, True, 2)
    assert config.model == student.model.replace(position_patch_size=2, cond_adaptor=True)
    assert config.tracking.parent_run_id == "parent-id" and config.storage.uri == student.storage.uri
