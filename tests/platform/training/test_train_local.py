"""The training loop in one process (no Ray, same code as a Ray worker): exact resume, idempotent resume from an
older checkpoint, no metric step logged twice, artifacts, NaN stop, upcycling phases, config changes refused.
The Ray-specific paths (DDP over gloo, S3, a real MLflow server, a killed worker) are in test_train_ray.py."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from dcdit.checkpoint import find_latest_checkpoint, load_checkpoint
from dcdit.errors import DCDiTError
from dcdit_platform.config import build_config
from dcdit_platform.tracking import Tracker
from dcdit_platform.training import plan_run, run_local
from helpers.training import load_weights, max_abs_diff, steps_logged, tiny_config


@pytest.fixture(scope="module")
def store(reference_run):
    """The reference run's storage root (and so its SQLite tracking store) for the module's runs."""
    return reference_run[1]


def run(store: str, name: str, resume_from=None, **sections) -> dict:
    config = build_config(tiny_config(storage={"uri": store}, **sections))
    return run_local(plan_run(config, name=name), resume_from=resume_from)


@pytest.fixture(scope="module")
def straight(reference_run):
    """The reference: 12 steps in one go (checkpoints at 4, 8, 12; samples and boundary maps at the end)."""
    summary, _, weights = reference_run
    return summary, weights[12]


def test_straight_run_checkpoints_logs_and_draws(store, straight):
    summary, _ = straight
    run_dir = os.path.join(store, "straight")
    assert summary["step"] == 12 and summary["checkpoint"].endswith("checkpoint_00000012")
    assert sorted(p for p in os.listdir(run_dir) if p.startswith("checkpoint_")) == \
        ["checkpoint_00000004", "checkpoint_00000008", "checkpoint_00000012"]
    ckpt = load_checkpoint(summary["checkpoint"])  # the checkpoint contract: manifest checked, weights-only optimizer
    assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json", "config.json"} <= \
        set(ckpt.manifest["files"])
    state = ckpt.state
    assert state["step"] == 12 and state["mlflow_run_id"] == summary["mlflow_run_id"]
    assert set(state["rng"]) == {"0"} and {"epoch", "position"} <= set(state["data_cursor"])
    assert torch.load(os.path.join(summary["checkpoint"], "optimizer.pt"), weights_only=True)["state"]
    tracker = Tracker(summary["tracking_uri"])
    assert summary["tracking_uri"] == f"sqlite:///{store}/mlflow.db"
    assert steps_logged(tracker, summary["mlflow_run_id"]) == list(range(1, 13))
    metrics = tracker.get_run(summary["mlflow_run_id"]).data.metrics
    for key in ("train/loss", "train/diffusion_loss", "train/ratio_loss", "router/compression_natural",
                "router/compression_effective", "optim/grad_norm", "optim/lr", "perf/images_per_s",
                "perf/tokens_per_s", "perf/gflops_per_s"):
        assert math.isfinite(metrics[key]), key
    assert any(k.startswith("router/kept_fraction_t") for k in metrics)
    artifacts = {a.path for a in tracker.client.list_artifacts(summary["mlflow_run_id"], "samples")}
    assert {"samples/samples_step00000012.png", "samples/boundary_maps_step00000012.png",
            "samples/kept_fraction_step00000012.png"} <= artifacts
    # The same pictures as MLflow images with a key and a step (files images/<key>+step+<step>+...).
    images = [a.path for a in tracker.client.list_artifacts(summary["mlflow_run_id"], "images")]
    for key in ("samples", "boundary_maps", "kept_fraction"):
        assert any(p.startswith(f"images/{key}+step+12+") and p.endswith(".png") for p in images), (key, images)


def test_stop_at_8_and_resume_to_12_is_exact(store, straight):
    _, (model_ref, ema_ref) = straight
    first = run(store, "resumed", train={"steps": 8})
    assert first["step"] == 8
    second = run(store, "resumed")
    assert second["step"] == 12 and second["mlflow_run_id"] == first["mlflow_run_id"]
    model, ema = load_weights(second["checkpoint"])
    assert max_abs_diff(model, model_ref) <= 1e-6 and max_abs_diff(ema, ema_ref) <= 1e-6
    tracker = Tracker(second["tracking_uri"])
    assert steps_logged(tracker, second["mlflow_run_id"]) == list(range(1, 13))  # each step exactly once


def test_resume_from_an_older_checkpoint_than_the_newest_is_exact(store, straight):
    _, (model_ref, ema_ref) = straight
    first = run(store, "older", train={"steps": 8})  # checkpoints 4 and 8, metrics of steps 1..8 logged
    older = os.path.join(store, "older", "checkpoint_00000004")
    second = run(store, "older", resume_from=older)  # as Ray does when the report of step 8 went unregistered
    assert second["step"] == 12
    model, ema = load_weights(second["checkpoint"])
    assert max_abs_diff(model, model_ref) <= 1e-6 and max_abs_diff(ema, ema_ref) <= 1e-6
    tracker = Tracker(second["tracking_uri"])
    assert steps_logged(tracker, first["mlflow_run_id"]) == list(range(1, 13))  # 5..8 ran twice, logged once
    assert tracker.get_run(first["mlflow_run_id"]).data.tags["dcdit.resumed_from_step"] == "4"


def test_the_worker_split_does_not_change_the_result(store, straight):
    """workers x grad_accum = 2 x 1 (the reference, run here as 1 x 2) versus 1 x 4 micro-batches of 2."""
    _, (model_ref, _) = straight
    summary = run(store, "accum", resources={"num_workers": 1}, train={"grad_accum": 2, "steps": 4})
    model_4 = load_weights(os.path.join(store, "straight", "checkpoint_00000004"))[0]
    assert max_abs_diff(load_weights(summary["checkpoint"])[0], model_4) <= 1e-6
    # ...but a different global batch is a different experiment.
    with pytest.raises(DCDiTError, match=r"different config \(train.global_batch changed\)"):
        run(store, "accum", resources={"num_workers": 1}, train={"global_batch": 4, "steps": 6})


class NanLatents:
    """A latent dataset (4x8x8 float16) whose samples in `bad` are NaN."""

    layout, num_classes, sample_shape = "latents", 4, (4, 8, 8)
    class_names = ["a", "b", "c", "d"]

    def __init__(self, n: int, bad: set[int]):
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def read(self, indices):
        idx = np.asarray(indices)
        data = np.random.default_rng(0).standard_normal((len(idx), 4, 8, 8)).astype(np.float16)
        data[np.isin(idx, list(self.bad))] = np.nan
        return data, (idx % 4).astype(np.int64)


def test_nan_loss_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(store, tmp_path):
    from dcdit.data import DataReader, write_dataset

    # The samples of step 3 (the reader's deterministic order) are NaN.
    order = DataReader(NanLatents(64, set()), batch_size=8, seed=3, prefetch=1).plan()
    step3 = [next(order)[0] for _ in range(3)][2]
    write_dataset(str(tmp_path / "latents"), NanLatents(64, set(step3.tolist())), shard_size=32, with_masks=False)
    with pytest.raises(DCDiTError) as err:
        run(store, "nan", data={"source": str(tmp_path / "latents")},
            model={"in_channels": 4}, train={"steps": 6}, checkpoint={"every": 2})
    message = str(err.value)
    assert "non-finite loss at step 3" in message and "Last good checkpoint: step 2" in message
    assert find_latest_checkpoint(os.path.join(store, "nan")).name == "checkpoint_00000002"
    tracker = Tracker(f"sqlite:///{store}/mlflow.db")
    runs = tracker.client.search_runs([tracker.experiment_id("dcdit")], "tags.`dcdit.run_name` = 'nan'")
    assert runs[0].info.status == "FAILED" and "step 3" in runs[0].data.tags["dcdit.error"]


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    from safetensors.torch import save_file

    from dcdit.config import ModelConfig
    from dcdit.models import DiT

    torch.manual_seed(11)
    dit = DiT(ModelConfig(arch="dit", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3,
                          num_classes=4, patch_size=2))
    path = tmp_path_factory.mktemp("dit") / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path))
    return str(path), dit


def test_upcycling_distills_first_then_trains_and_resumes_in_the_right_phase(store, tiny_dit):
    path, dit = tiny_dit
    upcycling = {"init_from": path, "distill_steps": 2, "steps": 4, "freeze_embedders": True, "cond_adaptor": True}
    frame = {"position_patch_size": 2}  # kept tokens in the DiT/2 teacher's position frame
    straight = run(store, "upcycle", train=upcycling, model=frame, checkpoint={"every": 1, "keep": 4})
    tracker = Tracker(straight["tracking_uri"])
    assert steps_logged(tracker, straight["mlflow_run_id"], "train/distill_loss") == [1, 2]
    assert steps_logged(tracker, straight["mlflow_run_id"]) == [1, 2, 3, 4]
    model, _ = load_weights(straight["checkpoint"])
    assert "cond_adaptor.weight" in model
    for name, value in dit.state_dict().items():
        if name.startswith(("t_embedder.", "y_embedder.")):
            assert torch.equal(model[name], value), name  # frozen embedders: still the DiT's
    state = load_checkpoint(os.path.join(store, "upcycle", "checkpoint_00000001")).state
    assert state["phase"] == "distill"

    first = run(store, "upcycle-resumed", train={**upcycling, "steps": 1}, model=frame)  # stopped in the warm-up
    second = run(store, "upcycle-resumed", train=upcycling, model=frame)
    assert max_abs_diff(load_weights(second["checkpoint"])[0], model) <= 1e-6
    assert steps_logged(tracker, first["mlflow_run_id"], "train/distill_loss") == [1, 2]


def test_images_and_tflops_seen_add_up_across_windows_and_resumption(store, straight):
    """train/tflops_seen is the sum of every window's compute; logged every 3 steps and resumed from the step-4
    checkpoint (written between two logging steps), it ends where the straight run (logged every step) ends."""
    summary, _ = straight
    tracker = Tracker(summary["tracking_uri"])

    def history(run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in tracker.metric_history(run_id, key)}

    ref = summary["mlflow_run_id"]
    gflops, step_time = history(ref, "perf/gflops_per_s"), history(ref, "perf/step_time_s")
    by_hand = sum(gflops[s] * step_time[s] / 1e3 for s in range(1, 13))  # one step per window: GFLOP/s x s
    assert history(ref, "train/tflops_seen")[12] == pytest.approx(by_hand, rel=1e-9)
    assert history(ref, "train/images_seen") == {s: 8.0 * s for s in range(1, 13)}  # global batch 8

    run(store, "seen", train={"steps": 8}, logging={"every": 3})
    resumed = run(store, "seen", resume_from="checkpoint_00000004", logging={"every": 3})
    seen = history(resumed["mlflow_run_id"], "train/tflops_seen")
    assert sorted(seen) == [3, 6, 8, 9, 12]
    assert seen[12] == pytest.approx(history(ref, "train/tflops_seen")[12], rel=1e-9)
    assert seen[3] < seen[6] < seen[8] < seen[9] < seen[12]
