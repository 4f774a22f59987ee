"""The evaluation actor's typed tasks, computed in this process (an EvalWorker is a plain class until Ray makes it an
actor): what a GenerateTask and an ExtractTask send back, a user error as a TaskError, and how object-store
references in the messages (extractor weights, in-memory images) are resolved on the actor's side."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from dcdit.config import ModelConfig
from dcdit.data.synthetic import render
from dcdit.features import DOMAIN_EXTRACTOR
from dcdit.generate import SamplingPlan, generate
from dcdit.metrics import FeatureStats
from dcdit.models import build_model
from dcdit_platform.evaluation.actors import EvalWorker, ExtractTask, GenerateTask, ModelSpec, TaskError
from dcdit_platform.evaluation.extractors import ExtractorSpec, prepare_extractor
from dcdit_platform.evaluation.sources import ArrayImages, FolderImages
from helpers.evaluation import TINY_FAMILY_FIELDS, write_png_folder

PLAN = SamplingPlan(sampler="ddim", steps=2, num_timesteps=1000, learn_sigma=True, cfg_scale=1.0, lite_cfg=False,
                    rho=0.25, null_class=4, seed=3, num_classes=4)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def worker(domain_classifier):
    config = ModelConfig(arch="dcdit", depth=1, hidden_size=32, num_heads=2, input_size=8, in_channels=3,
                         num_classes=4, **TINY_FAMILY_FIELDS["dcdit"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(config)
        for name, p in model.named_parameters():
            if "final_layer" in name or "adaLN" in name:
                p.data.normal_(0, 0.05)
    spec, _ = prepare_extractor(DOMAIN_EXTRACTOR, domain_classifier)
    previous = torch.get_num_threads()
    yield EvalWorker(spec, ModelSpec(config, model.state_dict(), None), threads=1)
    torch.set_num_threads(previous)


def batches_of(worker, images: list[np.ndarray]) -> tuple[FeatureStats, list[dict]]:
    """Features of each batch and their statistics, accumulated batch by batch."""
    features = [worker.extractor(batch) for batch in images]
    stats = FeatureStats.empty(features[0]["pool"].shape[1])
    for f in features:
        stats.update(f["pool"])
    return stats, features


def test_a_generate_task_sends_back_statistics_features_images_and_flops(worker):
    task = GenerateTask(shard=3, start=2, stop=6, plan=PLAN, shape=(3, 8, 8), batch_size=2, keep=("logits",),
                        count_flops=True, images_below=4)
    result = worker.run(task)
    model, _ = worker.generator()
    images = [generate(model, PLAN, np.arange(a, a + 2), (3, 8, 8), device=CPU)[0] for a in (2, 4)]
    stats, features = batches_of(worker, images)
    assert result.shard == 3 and set(result.stats) == {"pool"}
    for key, value in stats.to_arrays(moments=False).items():
        assert np.array_equal(result.stats["pool"][key], value), key
    assert set(result.features) == {"logits"}
    assert np.array_equal(result.features["logits"], np.concatenate([f["logits"].numpy() for f in features]))
    assert np.array_equal(result.images, images[0])  # samples 2 and 3 are below 4
    assert result.flops > 0 and result.flops_images == 2  # FLOPs of the first batch only


def test_an_extract_task_reads_its_indices_in_batches(worker):
    pictures = render(np.arange(8), image_size=8, num_classes=4).images
    source = ArrayImages(identity={"kind": "test"}, size=8, label="eight", array=pictures)
    result = worker.run(ExtractTask(shard=0, source=source, indices=np.array([5, 1, 3]), batch_size=2,
                                    keep=("pool",)))
    stats, features = batches_of(worker, [pictures[[5, 1]], pictures[[3]]])
    assert np.array_equal(result.stats["pool"]["sum"], stats.to_arrays(moments=False)["sum"])
    assert np.array_equal(result.features["pool"], np.concatenate([f["pool"].numpy() for f in features]))
    assert result.images is None and result.flops == 0.0


def test_a_user_error_comes_back_as_a_task_error(worker, tmp_path):
    write_png_folder(tmp_path / "a", render(np.arange(1), image_size=8).images)
    write_png_folder(tmp_path / "b", render(np.arange(1), image_size=16).images)
    source = FolderImages(identity={"kind": "folder", "files": "mixed"}, size=2, label="mixed", uri=str(tmp_path),
                          files=("a/000000.png", "b/000000.png"), crop=None)
    result = worker.run(ExtractTask(shard=0, source=source, indices=np.arange(2), batch_size=2))
    assert isinstance(result, TaskError) and result.message.startswith("images of different sizes")


def test_object_store_references_are_resolved_on_the_actor_side(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    data = b"weights of another machine"
    sha = hashlib.sha256(data).hexdigest()
    spec = ExtractorSpec("x", str(tmp_path / "driver" / "w.pth"), sha, blob="ref-1")
    fetched: list[str] = []

    def fetch(ref):
        fetched.append(ref)
        return data

    local = spec.resolved(fetch)
    assert fetched == ["ref-1"] and open(local.weights_path, "rb").read() == data
    assert local.resolved(fetch) is local and spec.resolved(fetch) == local  # no second fetch: the copy is here
    assert fetched == ["ref-1"]

    pictures = np.zeros((2, 4, 4, 3), np.uint8)
    in_memory = ArrayImages(identity={}, size=2, label="", array=pictures)
    assert in_memory.resolved(fetch) is in_memory
    remote = ArrayImages(identity={}, size=2, label="", array="ref-2")
    assert remote.resolved(lambda ref: pictures if ref == "ref-2" else None).array is pictures
