"""Fixtures of the evaluator's tests: feature-extractor weights made offline (a seeded random stand-in for the
Inception weights, which cannot be downloaded here, and a quickly trained synthetic domain classifier)."""

from __future__ import annotations

import pytest

from dcdit.features import train_domain_classifier
from helpers.evaluation import random_inception_weights


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    return random_inception_weights(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def domain_classifier(tmp_path_factory) -> str:
    """A domain classifier for 8x8 synthetic images of 4 classes, trained in a few seconds."""
    model = train_domain_classifier(seed=0, image_size=8, num_classes=4,
                                    recipe={"steps": 40, "batch_size": 32, "train_samples": 1000,
                                            "heldout_samples": 100})
    return str(model.save(tmp_path_factory.mktemp("clf") / "clf.safetensors"))
