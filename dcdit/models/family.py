"""Model families: what the rest of the code needs to know about an architecture, registered once per family.

A family answers the questions the platform would otherwise ask with `arch == ...` branches: how to build the
model, whether it routes tokens (a learned router, hence a ratio loss, tail dropping, Lite-CFG, router metrics and
probes), its analytic FLOPs at a kept fraction, which `ModelConfig` fields only it reads, and how runs of it are
named and described. Adding an architecture is one subclass here plus its entry in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch.nn as nn

from dcdit.config import ModelConfig
from dcdit.errors import DCDiTError
from dcdit.flops import MacCount, dcdit_macs, dit_macs
from dcdit.models.dcdit import DCDiT
from dcdit.models.dit import DiT


class ModelFamily:
    """One architecture. Subclasses set the class attributes and override what differs."""

    arch: str  # the value of ModelConfig.arch
    display_name: str  # how people call it ("DiT", "DC-DiT")
    routed: bool = False  # keeps a learned subset of tokens (router, ratio loss, tail dropping, Lite-CFG)
    own_fields: tuple[str, ...] = ()  # ModelConfig fields that only this family reads
    model_class: type[nn.Module]

    def build(self, config: ModelConfig) -> nn.Module:
        return self.model_class(config)

    def forward_macs(self, config: ModelConfig, kept_fraction: float | None = None, *,
                     kept_tokens: Sequence[int] | None = None) -> MacCount:
        """Analytic MACs of one forward pass of one sample (dcdit.flops' convention)."""
        raise NotImplementedError

    def router_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters that decide which tokens the backbone sees (none for a model without a learned router)."""
        return []

    def label(self, config: ModelConfig) -> str:
        """A short name usable in run names ("DiT_2", "DC-DiT")."""
        return self.display_name

    def describe(self, config: ModelConfig) -> str:
        """Depth x width (and what fixes its tokens), for tables: "DiT 12x384/2"."""
        return f"{self.display_name} {config.depth}x{config.hidden_size}"

    def fields(self, config: ModelConfig) -> dict:
        """The config's fields that this family reads (shared trunk + its own), e.g. to log only what applies."""
        foreign = {f for fam in FAMILIES.values() if fam is not self for f in fam.own_fields} - set(self.own_fields)
        return {k: v for k, v in dataclasses.asdict(config).items() if k not in foreign}


class DiTFamily(ModelFamily):
    """DiT (Peebles & Xie): fixed p x p patchify, every patch a token."""

    arch, display_name, model_class = "dit", "DiT", DiT
    own_fields = ("patch_size",)

    def forward_macs(self, config, kept_fraction=None, *, kept_tokens=None):
        if kept_fraction is not None or kept_tokens is not None:
            raise DCDiTError("a kept fraction applies to models with a router only; a DiT runs on every patch")
        return dit_macs(config)

    def label(self, config):
        return f"DiT_{config.patch_size}"

    def describe(self, config):
        return f"{super().describe(config)}/{config.patch_size}"


class DCDiTFamily(ModelFamily):
    """DC-DiT: a learned router keeps about 1/N of the patch-1 tokens for the DiT backbone."""

    arch, display_name, model_class = "dcdit", "DC-DiT", DCDiT
    routed = True
    own_fields = ("downsample_factor", "router", "encoder_blocks", "decoder_blocks", "scaffold_width",
                  "dechunk_sigma", "cond_adaptor", "position_patch_size")

    def forward_macs(self, config, kept_fraction=None, *, kept_tokens=None):
        return dcdit_macs(config, kept_fraction, kept_tokens=kept_tokens)

    def router_parameters(self, model):
        return list(model.router.parameters())  # empty for the random and grid controls


FAMILIES: dict[str, ModelFamily] = {f.arch: f for f in (DiTFamily(), DCDiTFamily())}


def family_of(config_or_arch: ModelConfig | str) -> ModelFamily:
    """The family of a config (or of an `arch` value)."""
    arch = config_or_arch if isinstance(config_or_arch, str) else config_or_arch.arch
    try:
        return FAMILIES[arch]
    except KeyError:
        raise DCDiTError(f"unknown model.arch={arch!r}; choose one of {', '.join(FAMILIES)}") from None


def forward_macs(config: ModelConfig, kept_fraction: float | None = None) -> MacCount:
    """Analytic MACs per sample of any model; routed models at `kept_fraction` of their tokens (default 1/N)."""
    return family_of(config).forward_macs(config, kept_fraction)


__all__ = ["ModelFamily", "DiTFamily", "DCDiTFamily", "FAMILIES", "family_of", "forward_macs"]
