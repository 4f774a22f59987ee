"""Feature extractors: the clear error when Inception weights are missing offline, refusal of pickled code, and the
synthetic-data domain classifier (trains, caches by key, round-trips, plugs into torch-fidelity)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error

import pytest
import torch
from safetensors.torch import save_file

from dcdit.errors import DCDiTError
from dcdit.features import (DOMAIN_EXTRACTOR, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, DomainClassifier,
                            build_extractor, domain_classifier_key, resolve_inception_weights,
                            train_domain_classifier)

TINY = {"steps": 60, "batch_size": 32, "train_samples": 2000, "heldout_samples": 200}


def check_clear_error(message: str) -> None:
    assert INCEPTION_WEIGHTS_FILE in message
    assert INCEPTION_WEIGHTS_URL in message
    assert "hub/checkpoints" in message and "--weights PATH" in message
    assert "\n" not in message


def test_missing_weights_path_names_the_file_and_where_to_put_it(tmp_path):
    with pytest.raises(DCDiTError) as err:
        build_extractor("inception-v3-compat", tmp_path / "nowhere.pth")
    check_clear_error(str(err.value))


def test_no_cached_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("DCDIT_OFFLINE", "1")
    with pytest.raises(DCDiTError, match="downloads are off") as err:
        resolve_inception_weights()
    check_clear_error(str(err.value))
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in str(err.value)

    # Without the switch a download is tried; no network (simulated so the test never downloads 95 MB) is the
    # same clear error.
    monkeypatch.delenv("DCDIT_OFFLINE")

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(DCDiTError, match="cannot be downloaded") as err:
        resolve_inception_weights()
    check_clear_error(str(err.value))


def test_weights_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"Mixed_6d.branch1x1.conv.weight": torch.zeros(1), "extra": DCDiTError("x")}, path)
    with pytest.raises(DCDiTError, match="pickled code"):
        build_extractor("inception-v3-compat", path)
    torch.save({"some.other.weight": torch.zeros(1)}, path)
    with pytest.raises(DCDiTError, match="not an Inception-v3"):
        build_extractor("inception-v3-compat", path)


def test_unknown_extractor_suggests_a_name():
    with pytest.raises(DCDiTError, match="did you mean 'inception-v3-compat'"):
        build_extractor("inception-v3-compta")


def test_domain_classifier_trains_caches_by_key_and_round_trips(tmp_path):
    model = train_domain_classifier(seed=0, image_size=8, num_classes=4, recipe=TINY)
    assert model.meta["heldout_accuracy"] >= 0.9  # the classes differ in shape, texture and hue
    assert model.meta["key"] == domain_classifier_key({"kind": "synthetic", "seed": 0, "image_size": 8,
                                                       "num_classes": 4}, TINY)
    # The cache key changes with anything that changes the classifier.
    base = {"kind": "synthetic", "seed": 0, "image_size": 8, "num_classes": 4}
    keys = {domain_classifier_key(base, TINY), domain_classifier_key({**base, "seed": 1}, TINY),
            domain_classifier_key({**base, "image_size": 16}, TINY), domain_classifier_key(base, {**TINY, "lr": 1e-3}),
            domain_classifier_key(base)}
    assert len(keys) == 5

    path = model.save(tmp_path / "clf.safetensors")
    loaded = DomainClassifier.load(path)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for a, b in zip(model(images), loaded(images)):
        assert torch.equal(a, b)
    extractor = build_extractor(DOMAIN_EXTRACTOR, path)
    assert extractor.distance_name == "FD" and not extractor.is_inception
    feats = extractor(images.permute(0, 2, 3, 1).numpy())  # NHWC numpy works too
    assert feats["pool"].shape == (5, 128) and feats["logits"].shape == (5, 4)
    assert extractor.identity["weights_sha256"] == loaded.meta["weights_sha256"]

    # Registered with torch-fidelity under the same name.
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[DOMAIN_EXTRACTOR]
    wrapped = cls(DOMAIN_EXTRACTOR, ["features", "logits"], feature_extractor_weights_path=str(path))
    features, logits = wrapped(images)
    assert torch.equal(features, feats["pool"]) and torch.equal(logits, feats["logits"])

    with pytest.raises(DCDiTError, match="not a saved"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk")
        DomainClassifier.load(tmp_path / "junk.safetensors")


def test_domain_classifier_resizes_other_resolutions():
    model = DomainClassifier(num_classes=3, image_size=8)
    features, logits = model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert features.shape == (2, 128) and logits.shape == (2, 3)
    assert torch.isfinite(features).all()


def test_saved_domain_classifier_is_the_same_file_in_every_process(tmp_path):
    """Its sha256 names the feature space in every protocol id, so equal weights must give equal bytes (safetensors
    writes several metadata keys in a per-process random order; three processes would differ 5 times in 6)."""
    script = ("import sys, torch; from dcdit.features import DomainClassifier; torch.manual_seed(0); "
              "m = DomainClassifier(num_classes=3, image_size=8); m.meta = {'a': 1, 'b': 2, 'c': 3}; "
              "m.save(sys.argv[1])")
    paths = [tmp_path / f"dc{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=120)
    assert len({p.read_bytes() for p in paths}) == 1
    assert DomainClassifier.load(paths[0]).meta["b"] == 2


def test_domain_classifier_files_written_with_several_metadata_keys_still_load(tmp_path):
    torch.manual_seed(0)
    model = DomainClassifier(num_classes=3, image_size=8)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "old.safetensors"), metadata={
        "format": DOMAIN_EXTRACTOR, "config": json.dumps(model.config()), "meta": json.dumps({"seed": 4})})
    loaded = DomainClassifier.load(tmp_path / "old.safetensors")
    assert loaded.meta["seed"] == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


class _CodeRunner:
    """Unpickling this runs code that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_other_extractor_weights_are_read_weights_only_and_checked_against_the_architecture(tmp_path):
    """(A full VGG16 file is 528 MB: the accepted path is the one Inception takes in every evaluator test.)"""
    marker = tmp_path / "ran"
    torch.save({"features.0.weight": _CodeRunner(marker)}, tmp_path / "evil.pth")
    with pytest.raises(DCDiTError, match="pickled code"):
        build_extractor("vgg16", tmp_path / "evil.pth")
    assert not marker.exists()
    torch.save({"features.0.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(DCDiTError, match="does not hold the vgg16 weights"):
        build_extractor("vgg16", tmp_path / "partial.pth")
    with pytest.raises(DCDiTError, match="cannot take --weights"):  # TorchScript archives can run code
        build_extractor("clip-vit-b-32", tmp_path / "partial.pth")

