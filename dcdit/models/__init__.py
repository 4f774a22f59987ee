"""Model zoo: the DiT baseline and DC-DiT, built from a `ModelConfig`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from dcdit.config import ModelConfig, preset
from dcdit.models.dcdit import DCDiT
from dcdit.models.dit import DiT
from dcdit.models.family import FAMILIES, ModelFamily, family_of, forward_macs


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config describes (DiT or DC-DiT), freshly initialised."""
    return family_of(config).build(config)


def count_params(config: ModelConfig) -> int:
    """Trainable parameters of the model a config describes, counted on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


def create_model(name: str, **overrides: Any) -> nn.Module:
    """A preset by name ("DiT-B/2", "DC-DiT-S"), e.g. create_model("DiT-B/2", input_size=32, num_classes=1000)."""
    return build_model(preset(name, **overrides))


__all__ = ["DiT", "DCDiT", "build_model", "create_model", "count_params", "FAMILIES", "ModelFamily", "family_of", "forward_macs"]
