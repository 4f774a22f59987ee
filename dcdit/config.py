"""Typed model configs, the preset table, and strict construction from plain dicts.

`ModelConfig` describes both architectures (DiT with a fixed patchify, DC-DiT with a learned router); presets
are one visible table. `from_dict` rejects unknown keys with a suggestion, wrong types and bad values.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from dcdit.errors import DCDiTError, did_you_mean, shown

Arch = Literal["dit", "dcdit"]
# predictability (v2) and cosine (v1) are learned; random and grid are the controls at the same budget.
RouterKind = Literal["predictability", "cosine", "random", "grid"]
LEARNED_ROUTERS = ("predictability", "cosine")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One model: the DiT trunk plus, for DC-DiT, the chunking scaffold around it."""

    arch: Arch
    depth: int
    hidden_size: int
    num_heads: int
    input_size: int = 32  # latent (or pixel) grid side: 32 for 256px ImageNet latents
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    mlp_ratio: float = 4.0
    # DiT only: side of the square patch of the fixed patchify.
    patch_size: int = 2
    # DC-DiT only.
    downsample_factor: float = 4.0  # target compression N: the router aims to keep 1/N of the tokens
    router: RouterKind = "predictability"  # see dcdit.models.routers
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    scaffold_width: int | None = None  # encoder/decoder width; None = hidden_size // 4
    dechunk_sigma: float = 1.0  # grid units; the paper suggests 2.0 at 512px
    cond_adaptor: bool = False  # upcycling: trainable LayerNorm on the conditioning fed to the scaffold
    # Kept tokens' sin-cos positions in the coordinate frame of a DiT with this patch size (1: the token grid's own);
    # an upcycled DC-DiT uses its teacher's, the frame its copied blocks were trained in.
    position_patch_size: int = 1

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def scaffold_channels(self) -> int:
        return self.scaffold_width or self.hidden_size // 4

    def scaffold_block_widths(self, *, encoder: bool) -> list[tuple[int, int]]:
        """(in, out) channels of the DC-DiT scaffold blocks: the encoder's last block widens to the backbone width d,
        the decoder's first narrows back (see ResBlock in dcdit.models.dcdit for where the width changes)."""
        width, blocks = self.scaffold_channels, self.encoder_blocks if encoder else self.decoder_blocks
        widths = [(width, width)] * blocks
        widths[-1 if encoder else 0] = (width, self.hidden_size) if encoder else (self.hidden_size, width)
        return widths

    @property
    def num_tokens(self) -> int:
        """Tokens entering the backbone for DiT; grid positions routed over for DC-DiT."""
        if self.arch == "dit":
            return (self.input_size // self.patch_size) ** 2
        return self.input_size**2

    def replace(self, **changes: Any) -> ModelConfig:
        return from_dict(ModelConfig, {**dataclasses.asdict(self), **changes})

    def validate(self) -> None:
        # Sizes outside these ranges are typos, not experiments (DiT-XL: depth 28, width 1152, 16 heads); checked
        # first, so that a zero never reaches a division below.
        for key, (low, high) in _RANGES.items():
            value = getattr(self, key)
            _check(value is None or low <= value <= high, key, value, f"must be in [{low}, {high}]")
        _check(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
               f"must be divisible by num_heads={self.num_heads}")
        _check((self.hidden_size // self.num_heads) % 2 == 0, "num_heads", self.num_heads,
               "must leave an even head dimension")
        _check(self.hidden_size % 4 == 0, "hidden_size", self.hidden_size,
               "must be divisible by 4 (2D sin-cos position embedding)")
        _check(0.0 <= self.class_dropout_prob < 1.0, "class_dropout_prob", self.class_dropout_prob,
               "must be in [0, 1)")
        if self.arch == "dit":
            _check(self.input_size % self.patch_size == 0, "patch_size", self.patch_size,
                   f"must divide input_size={self.input_size}")
        else:
            _check(1.0 < self.downsample_factor <= self.input_size**2, "downsample_factor", self.downsample_factor,
                   f"must be > 1 (the target compression N) and at most the {self.input_size**2} grid tokens")
            _check(0.0 < self.dechunk_sigma <= self.input_size, "dechunk_sigma", self.dechunk_sigma,
                   f"must be in (0, input_size={self.input_size}]")
            _check(self.encoder_blocks >= 1 and self.decoder_blocks >= 1, "encoder_blocks",
                   (self.encoder_blocks, self.decoder_blocks), "need at least one encoder and decoder block")
            _check(self.scaffold_channels % 4 == 0, "scaffold_width", self.scaffold_channels,
                   "must be divisible by 4 (the router works at a quarter of it)")
            _check(self.position_patch_size >= 1 and self.input_size % self.position_patch_size == 0,
                   "position_patch_size", self.position_patch_size, f"must divide input_size={self.input_size}")
            if self.router == "grid":
                side = self.grid_patch
                _check(side * side == self.downsample_factor and self.input_size % side == 0, "downsample_factor",
                       self.downsample_factor, f"must be p*p with p dividing input_size={self.input_size} for "
                       "router='grid' (one kept token per p x p patch); use N = 4 or 16, or router='random'")

    @property
    def grid_patch(self) -> int:
        """Side p of the patches of router='grid', whose N is p * p."""
        return max(1, math.isqrt(round(self.downsample_factor)))

    @property
    def learned_router(self) -> bool:
        """Whether the router has parameters trained through the STE gate and the ratio loss (not a control)."""
        return self.arch == "dcdit" and self.router in LEARNED_ROUTERS


_RANGES = {"depth": (1, 256), "hidden_size": (4, 16384), "num_heads": (1, 256), "input_size": (1, 4096),
           "in_channels": (1, 64), "num_classes": (1, 1_000_000), "mlp_ratio": (0.25, 64.0), "patch_size": (1, 64),
           "encoder_blocks": (1, 64), "decoder_blocks": (1, 64), "scaffold_width": (4, 16384)}


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise DCDiTError(f"model.{key}={shown(value)} {rule}")


# The preset table. DiT sizes from Peebles & Xie; DC-DiT sizes from arXiv 2603.06351 (scaffold at d/4).
_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PRESETS: dict[str, dict[str, Any]] = {
    **{f"DiT-{s}/{p}": dict(arch="dit", patch_size=p, **size) for s, size in _SIZES.items() for p in (2, 4, 8)},
    **{f"DC-DiT-{s}": dict(arch="dcdit", **size) for s, size in _SIZES.items()},
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of a named preset ("DiT-B/2", "DC-DiT-XL"), with keyword overrides validated."""
    if name not in PRESETS:
        raise DCDiTError(f"unknown model preset {name!r}{did_you_mean(name, PRESETS)}; "
                         f"choose one of {', '.join(PRESETS)}")
    return from_dict(ModelConfig, {**PRESETS[name], **overrides})


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "model") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys, wrong types and values `validate` refuses.

    Nested dataclass fields are built recursively; `prefix` names the position in the config tree in errors.
    """
    if not isinstance(data, dict):
        raise DCDiTError(f"{prefix} must be a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise DCDiTError(f"unknown config key '{prefix}.{key}'{did_you_mean(key, fields)}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DCDiTError(f"missing required config key '{prefix}.{missing[0]}'")
    values = {key: _coerce(value, hints[key], f"{prefix}.{key}") for key, value in data.items()}
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint, accepting ints for floats and lists for tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=where)
    if origin is Literal:
        if value not in args:
            raise DCDiTError(f"{where}={shown(value)} must be one of {', '.join(map(repr, args))}"
                             f"{did_you_mean(str(value), map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except DCDiTError as err:
                errors.append(str(err))
        raise DCDiTError(errors[0] if errors else f"{where}={shown(value)} has the wrong type")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise DCDiTError(f"{where}={shown(value)} must be a list")
        item = args[0] if args else Any
        return (tuple if origin is tuple else list)(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise DCDiTError(f"{where}={shown(value)} must be a mapping")
        return dict(value)
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DCDiTError(f"{where}={shown(value)} must be a number")
        if not math.isfinite(value):
            raise DCDiTError(f"{where}={shown(value)} must be finite")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DCDiTError(f"{where}={shown(value)} must be an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise DCDiTError(f"{where}={shown(value)} must be true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise DCDiTError(f"{where}={shown(value)} must be a string")
        return value
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (JSON and YAML friendly)."""
    return dataclasses.asdict(obj)


__all__ = ["ModelConfig", "LEARNED_ROUTERS", "PRESETS", "preset", "from_dict", "to_dict"]
