"""Reading files that come from outside without running their code: weights-only torch pickles and safetensors,
checked against the names and shapes the reader expects. Every failure is a one-line DCDiTError naming the file.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from dcdit.errors import DCDiTError


def load_weights_only(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load restricted to tensors, primitives and containers; a pickle that needs code is refused, not run.

    argparse.Namespace is allowed too: DiT/fast-DiT training checkpoints store their arguments as one, and it is
    rebuilt from a plain attribute dict without running any code from the file.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # a damaged or foreign file: an opcode the restricted unpickler does not know
            detail = _first_line(str(err).split("WeightsUnpickler error:")[-1], err)
            raise DCDiTError(f"cannot read {path}: not a weights-only PyTorch file ({detail}); re-download it, "
                             f"or convert it to safetensors in a trusted environment") from None
        raise DCDiTError(f"refusing to load {path}: it contains pickled code ({found.group(1)}); convert it to "
                         f"safetensors or a plain state dict (tensors only) in a trusted environment") from None
    except Exception as err:  # noqa: BLE001 - a damaged file fails anywhere in the unpickler (struct.error, ...)
        raise DCDiTError(f"cannot read {path}: not a readable PyTorch file ({_first_line(str(err), err)}); "
                         f"re-download it") from None


def _first_line(text: str, err: BaseException) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def load_state_dict_file(path: str | os.PathLike, *, expected: dict[str, tuple[int, ...]] | None = None,
                         what: str = "weights") -> dict[str, torch.Tensor]:
    """The one way a weights file from outside is read: safetensors (by suffix) or a weights-only torch pickle,
    which must hold a flat dict of tensors; with `expected` (name -> shape) every name must be there with its
    shape and nothing else. Anything else is a one-line DCDiTError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DCDiTError(f"{what} file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise DCDiTError(f"cannot read {path}: not a valid safetensors file ({' '.join(str(err).split())[:120]})"
                             f"; re-download or re-export it") from None
    else:
        state = load_weights_only(path)
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DCDiTError(f"{path} is not a {what} state dict (a mapping of names to tensors); pass the {what} file "
                         f"itself")
    if expected is not None:
        problem = shape_mismatch(state, expected)
        if problem:
            raise DCDiTError(f"{path} does not hold the {what}: {problem}; pass the {what} file itself")
    return state


def shape_mismatch(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    """How the tensors of `state` differ from the names and shapes `expected` (None when they do not)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        listed = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        return f"{listed} ({len(missing)} missing, {len(unexpected)} unexpected names)"
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            return f"{name} has shape {tuple(state[name].shape)}, expected {tuple(shape)}"
    return None


__all__ = ["load_state_dict_file", "load_weights_only", "shape_mismatch"]
