"""Results that do not depend on the cluster's shape, on a real local Ray cluster: DiT and DC-DiT trained by 2 Ray
Train workers, by 1 worker with 2 accumulation micro-steps, and resumed with a different worker count end with the
weights that one process with one micro-batch trains, up to float summation order. DC-DiT's first part runs with
`resources.num_workers: [1, 2]`, Ray Train's elastic scaling.

Each model trains on Ray in two parts: steps 1-2 with 2 workers x 1 micro-step, then `dcdit resume` with
`resources.num_workers=1 train.grad_accum=2` for steps 3-4 (the elastic case: checkpointed with 2 workers, resumed
with 1). The in-process reference trains 4 steps as 1 worker x 1 micro-batch of 8."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import yaml
from dcdit_platform.cli import main as cli_main
from dcdit_platform.config import build_config
from dcdit_platform.training import plan_run, run_local
from helpers.training import DIT, load_weights, max_abs_diff, tiny_config

pytestmark = pytest.mark.slow

# Ratio groups of 2 samples, so that micro-batches of 8 and 4 both hold whole groups; Adam's eps at 1e-6 so that
# it does not scale the rounding noise of gradients that are zero in exact arithmetic up to lr-sized steps (see
# tests/platform/training/test_step.py, which measures both in one process).
SETTINGS = {"train": {"steps": 4, "eps": 1e-6, "chunking": {"ratio_group_size": 2}},
            "checkpoint": {"every": 2, "keep": 2}, "logging": {"every": 2, "artifacts_every": 0}}
# Tolerance, argued in test_step.py's invariance test: splitting differently (other noise per sample) moves the
# weights by ~2 lr = 4e-3 per step; summation order by at most lr x dg / eps ~ 2e-6 per step, measured <= 6e-7
# after 4 steps. 1e-5 after 4 steps is 1000x below the first and 16x above the second.
TOLERANCE = {2: 5e-6, 4: 1e-5}


def _cli(args: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli_main([*args, "--json"])
    assert rc == 0, stdout.getvalue()[-3000:] + stderr.getvalue()[-3000:]
    return json.loads(stdout.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """{model: (its Ray run folder, its reference run folder)}, all in one storage root (one MLflow SQLite store)."""
    out = {}
    address = ray_cluster.get_runtime_context().gcs_address
    root = tmp_path_factory.mktemp("runs")
    for label, model, workers in (("dcdit", None, [1, 2]), ("dit", DIT, 2)):
        sections = {**SETTINGS, **({"model": model} if model else {}), "resources": {"num_workers": workers},
                    "storage": {"uri": str(root)}}
        config_file = root / f"{label}.yaml"
        config_file.write_text(yaml.safe_dump(tiny_config(**sections)))
        common = ["--address", address]
        first = _cli(["train", str(config_file), "--name", label, "-o", "train.steps=2", *common])
        second = _cli(["resume", label, "--storage", str(root), "-o", "train.steps=4",
                       "-o", "resources.num_workers=1", "-o", "train.grad_accum=2", *common])
        assert (first["step"], second["step"]) == (2, 4)
        reference = build_config(tiny_config(**{**sections, "resources": {"num_workers": 1}}))
        run_local(plan_run(reference, name=f"{label}-reference"))
        out[label] = (root / label, root / f"{label}-reference")
    return out


def _assert_same_tokens(state: dict, reference_checkpoint) -> None:
    """DC-DiT's hard routing could flip a token with p within ~1e-7 of 0.5 and move the weights discontinuously:
    the kept fractions of the logged window must agree exactly, so that a flip shows as such."""
    reference = json.loads((reference_checkpoint / "state.json").read_text())["metrics"]
    kept = {k: v for k, v in state["metrics"].items() if k.startswith("router/kept_fraction")}
    assert kept == {k: v for k, v in reference.items() if k.startswith("router/kept_fraction")}


@pytest.mark.parametrize("label", ["dcdit", "dit"])
def test_two_workers_train_the_weights_of_one(runs, label):
    ray_run, reference = runs[label]
    state = json.loads((ray_run / "checkpoint_00000002" / "state.json").read_text())
    assert state["world_size"] == 2  # DC-DiT's elastic [1, 2] got both workers of the 2-CPU cluster
    _assert_same_tokens(state, reference / "checkpoint_00000002")
    model, ema = load_weights(ray_run / "checkpoint_00000002")
    model_ref, ema_ref = load_weights(reference / "checkpoint_00000002")
    assert max_abs_diff(model, model_ref) <= TOLERANCE[2] and max_abs_diff(ema, ema_ref) <= TOLERANCE[2]


@pytest.mark.parametrize("label", ["dcdit", "dit"])
def test_a_run_resumed_with_another_worker_count_ends_where_an_uninterrupted_run_ends(runs, label):
    ray_run, reference = runs[label]
    state = json.loads((ray_run / "checkpoint_00000004" / "state.json").read_text())
    assert state["world_size"] == 1  # steps 3-4 ran as 1 worker x 2 micro-steps
    _assert_same_tokens(state, reference / "checkpoint_00000004")
    model, ema = load_weights(ray_run / "checkpoint_00000004")
    model_ref, ema_ref = load_weights(reference / "checkpoint_00000004")
    assert max_abs_diff(model, model_ref) <= TOLERANCE[4] and max_abs_diff(ema, ema_ref) <= TOLERANCE[4]
    # The weights moved (about 4 Adam steps of lr 2e-3), so the agreement above is not that of untrained models.
    first, _ = load_weights(ray_run / "checkpoint_00000002")
    assert max_abs_diff(model, first) > 2e-3
