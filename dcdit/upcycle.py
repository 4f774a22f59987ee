"""Upcycling: a DC-DiT initialised from a pretrained DiT (arXiv 2603.06351 v1, "Upcycling").

The DiT's timestep/class embedders and blocks are copied unchanged; the chunking scaffold (encoder, router,
residual, decoder, final layer at patch size 1) starts fresh, its kept tokens placed in the DiT's position frame.
`UpcycleResult` says which tensors went where; dcdit.distill's `BlockDistiller` runs the warm-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dcdit.config import PRESETS, ModelConfig, from_dict, preset
from dcdit.errors import DCDiTError
from dcdit.models.dcdit import DCDiT
from dcdit.models.dit import DiT
from dcdit.models.family import family_of
from dcdit.pretrained import load_dit

# Modules DiT and DC-DiT share by name and meaning; everything else in either model is specific to it.
SHARED_PREFIXES = ("t_embedder.", "y_embedder.", "blocks.")
# Config fields taken from the DiT when the target is a preset name: they describe the data, not the size.
_DATA_FIELDS = ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob", "mlp_ratio")


@dataclass
class UpcycleResult:
    """The upcycled model and where each of its tensors came from (state-dict names)."""

    model: DCDiT
    copied: list[str] = field(default_factory=list)  # DC-DiT tensors copied from the DiT
    new: list[str] = field(default_factory=list)  # DC-DiT tensors left at their fresh initialisation
    skipped: list[str] = field(default_factory=list)  # DiT tensors with no place in DC-DiT

    def summary(self) -> str:
        """A few readable lines: counts and parameters per top-level module for each of the three lists."""
        state = self.model.state_dict()

        def describe(names: list[str], sizes: dict[str, int]) -> str:
            groups: dict[str, list[int]] = {}
            for name in names:
                groups.setdefault(name.split(".")[0], []).append(sizes.get(name, 0))
            parts = [f"{g} ({len(v)} tensors, {_count(sum(v))})" for g, v in groups.items()]
            return ", ".join(parts) or "none"

        model_sizes = {k: v.numel() for k, v in state.items()}
        copied_params = sum(model_sizes[k] for k in self.copied)
        total = sum(model_sizes.values())
        return "\n".join([
            f"upcycled {self.model.config.arch} model: {_count(copied_params)} of {_count(total)} parameters "
            f"copied from the DiT ({100 * copied_params / max(total, 1):.1f}%)",
            f"  copied:  {describe(self.copied, model_sizes)}",
            f"  new:     {describe(self.new, model_sizes)}",
            f"  skipped: {', '.join(self.skipped) if len(self.skipped) <= 8 else describe(self.skipped, {})}",
        ])


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n}"


def upcycle(dit_or_path: DiT | str | os.PathLike, target: str | ModelConfig | None = "DC-DiT-XL", *,
            downsample_factor: float | None = None, cond_adaptor: bool | None = None,
            **overrides: Any) -> UpcycleResult:
    """A DC-DiT whose embedders and DiT blocks are copies of a pretrained DiT's.

    `dit_or_path` is a `DiT` or anything `load_dit` accepts. `target` is a DC-DiT preset name (its input size,
    channels and classes are taken from the DiT), a full `ModelConfig`, or None for the DiT's own size.
    `downsample_factor`, `cond_adaptor` (the paper's trainable LayerNorm on the scaffold's conditioning) and
    `overrides` change the target config; left at None they keep the target's values (4.0 and False for presets).
    Kept tokens get positions in the DiT's frame (`position_patch_size` = its patch size): a preset or None target
    takes it, a full config must state it (or override it).
    Shapes are checked before the model is built: a target that does not fit raises a DCDiTError listing the
    tensors that differ.
    """
    if isinstance(dit_or_path, DiT):
        dit = dit_or_path
    else:  # a plain state dict does not record its heads: the target's must be the DiT's anyway
        dit = load_dit(dit_or_path, num_heads=_heads_hint(target, overrides))
    config = _target_config(dit.config, target, {
        **({"downsample_factor": downsample_factor} if downsample_factor is not None else {}),
        **({"cond_adaptor": cond_adaptor} if cond_adaptor is not None else {}), **overrides})

    source = dit.state_dict()
    with torch.device("meta"):  # shapes only: a mismatch fails before an XL-sized model is initialised
        shapes = {k: v.shape for k, v in DCDiT(config).state_dict().items()}
    _check_fit(source, shapes, dit.config, config)

    model = DCDiT(config).to(next(iter(source.values())).device)
    state = model.state_dict()
    copied = [k for k in state if k.startswith(SHARED_PREFIXES)]
    with torch.no_grad():
        for name in copied:
            state[name].copy_(source[name])
    return UpcycleResult(model=model, copied=copied, new=[k for k in state if k not in set(copied)],
                         skipped=[k for k in source if not k.startswith(SHARED_PREFIXES)])


def _heads_hint(target: str | ModelConfig | None, overrides: dict[str, Any]) -> int | None:
    """The target's head count: plain DiT state dicts do not record theirs, and the copy must use the same."""
    if "num_heads" in overrides:
        return overrides["num_heads"]
    if isinstance(target, ModelConfig):
        return target.num_heads
    if isinstance(target, str) and target in PRESETS:
        return PRESETS[target]["num_heads"]
    return None


def _target_config(dit: ModelConfig, target: str | ModelConfig | None, changes: dict[str, Any]) -> ModelConfig:
    data = {k: getattr(dit, k) for k in _DATA_FIELDS}
    if target is None:
        config = from_dict(ModelConfig, dict(arch="dcdit", depth=dit.depth, hidden_size=dit.hidden_size,
                                             num_heads=dit.num_heads, **data))
    elif isinstance(target, str):
        config = preset(target, **data)
    elif isinstance(target, ModelConfig):
        config = target
    else:
        raise DCDiTError(f"upcycle target must be a preset name like 'DC-DiT-XL' or a ModelConfig, "
                         f"got {type(target).__name__}")
    if not isinstance(target, ModelConfig) and "position_patch_size" not in changes:
        changes = {**changes, "position_patch_size": dit.patch_size}
    config = config.replace(**changes) if changes else config
    if not _builds_dcdit(config.arch):
        raise DCDiTError(f"upcycle target has arch={config.arch!r}; upcycling builds a DC-DiT, "
                         f"pick a DC-DiT preset such as 'DC-DiT-XL'")
    if config.position_patch_size != dit.patch_size and "position_patch_size" not in changes:
        raise DCDiTError(f"the DC-DiT target places kept tokens in the position frame of patch size "
                         f"{config.position_patch_size} but the DiT's blocks were trained at patch size "
                         f"{dit.patch_size}; set model.position_patch_size={dit.patch_size}")
    return config


def _builds_dcdit(arch: str) -> bool:
    """Upcycling copies into a `DCDiT`: a target is a config of a family built on that class."""
    return family_of(arch).model_class is DCDiT


def _check_fit(source: dict[str, torch.Tensor], target: dict[str, torch.Size], dit: ModelConfig,
               config: ModelConfig) -> None:
    """Every shared tensor must exist on both sides with one shape, and the unshaped settings must agree."""
    problems = []
    for name in [k for k in target if k.startswith(SHARED_PREFIXES)]:
        if name not in source:
            problems.append(f"{name} {tuple(target[name])} (not in the DiT)")
        elif source[name].shape != target[name]:
            problems.append(f"{name} DiT {tuple(source[name].shape)} vs DC-DiT {tuple(target[name])}")
    problems += [f"{name} {tuple(source[name].shape)} (not in the DC-DiT)" for name in source
                 if name.startswith(SHARED_PREFIXES) and name not in target]
    if problems:
        shown = "; ".join(problems[:12])
        more = f"; and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise DCDiTError(f"the DiT (depth {dit.depth}, width {dit.hidden_size}) does not fit the DC-DiT target "
                         f"(depth {config.depth}, width {config.hidden_size}): {len(problems)} tensors differ: "
                         f"{shown}{more}; {_size_hint(dit)}")
    # Neither changes a tensor's shape, but either would make the copied blocks compute something else.
    for key in ("num_heads", "in_channels"):
        if getattr(dit, key) != getattr(config, key):
            raise DCDiTError(f"the DiT has {key}={getattr(dit, key)} but the DC-DiT target has "
                             f"{key}={getattr(config, key)}; set {key}={getattr(dit, key)} on the target")


def _size_hint(dit: ModelConfig) -> str:
    size = (dit.depth, dit.hidden_size, dit.num_heads)
    names = [name for name, p in PRESETS.items()
             if _builds_dcdit(p["arch"]) and (p["depth"], p["hidden_size"], p["num_heads"]) == size]
    return f"use target='{names[0]}' (the DiT's size)" if names else "pass target=None to match the DiT's size"


def freeze_embedders(model: nn.Module) -> list[str]:
    """Stop training the timestep and class embedders (the paper freezes them when upcycling); returns their names."""
    frozen = []
    for prefix in ("t_embedder", "y_embedder"):
        for name, param in getattr(model, prefix).named_parameters():
            param.requires_grad_(False)
            frozen.append(f"{prefix}.{name}")
    return frozen


__all__ = ["UpcycleResult", "upcycle", "freeze_embedders", "SHARED_PREFIXES"]
