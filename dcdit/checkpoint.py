"""The checkpoint contract: one local directory of safetensors weights, a weights-only optimizer pickle, JSON
training state and a MANIFEST.json (sha256 + size of every file) written last and atomically, so a checkpoint
without a valid manifest does not exist. Also the RNG capture/restore that exact resume needs.

Copying the directory to remote storage is the platform's job; nothing here knows about S3.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcdit.errors import DCDiTError
from dcdit.safeload import load_weights_only

MANIFEST = "MANIFEST.json"
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE = (
    "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json", "config.json")
CHECKPOINT_FILES = (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE)
FORMAT = "dcdit-checkpoint"
VERSION = 1
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns; absent parts are None."""

    path: Path
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any] | None
    state: dict[str, Any]
    config: dict[str, Any] | None
    manifest: dict[str, Any]

    @property
    def step(self) -> int | None:
        return self.state.get("step")


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """The directory of the checkpoint at `step` under `root` (checkpoint_00001000)."""
    return Path(root) / f"checkpoint_{step:08d}"


# --- save ------------------------------------------------------------------------------------------------------------

def save_checkpoint(directory: str | os.PathLike, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None = None, optimizer_state: dict[str, Any] | None = None,
                    state: dict[str, Any], config: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory; the manifest goes last, so an interrupted save leaves no checkpoint.

    `state` is anything JSON can hold (step, data cursor, `capture_rng_state()`, config hash); `config` is
    written to config.json. Saving over an existing checkpoint first removes its manifest.
    """
    directory = Path(directory)
    # Validate everything before touching the disk: a failed save must not destroy the checkpoint it overwrites.
    state_text = _to_json(state, "state")
    config_text = _to_json(config, "config") if config is not None else None
    model_tensors = _safetensors_ready(model_state, "model_state")
    ema_tensors = _safetensors_ready(ema_state, "ema_state") if ema_state is not None else None
    if optimizer_state is not None:
        _check_weights_only(optimizer_state, "optimizer_state")

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    written = [MODEL_FILE]
    _atomic_write(directory / MODEL_FILE, lambda p: save_file(model_tensors, str(p), metadata={"format": "pt"}))
    if ema_tensors is not None:
        _atomic_write(directory / EMA_FILE, lambda p: save_file(ema_tensors, str(p), metadata={"format": "pt"}))
        written.append(EMA_FILE)
    if optimizer_state is not None:
        _atomic_write(directory / OPTIMIZER_FILE, lambda p: torch.save(optimizer_state, p))
        written.append(OPTIMIZER_FILE)
    _atomic_write(directory / STATE_FILE, lambda p: p.write_text(state_text))
    written.append(STATE_FILE)
    if config_text is not None:
        _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(config_text))
        written.append(CONFIG_FILE)
    # Files of an earlier save into this directory that this save did not write would be stale.
    for name in {EMA_FILE, OPTIMIZER_FILE, CONFIG_FILE} - set(written):
        (directory / name).unlink(missing_ok=True)

    manifest = {"format": FORMAT, "version": VERSION, "created_unix": time.time(),
                "files": {name: {"sha256": _sha256(directory / name), "size": (directory / name).stat().st_size}
                          for name in written}}
    _atomic_write(directory / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2, sort_keys=True)))
    _fsync_dir(directory)
    return directory


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise DCDiTError(f"checkpoint {what} must be JSON-serialisable ({err}); store tensors and arrays as lists "
                         f"or base64 (capture_rng_state does this for RNG states)") from None


def _safetensors_ready(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their memory: safetensors refuses views and tensors sharing storage."""
    if not isinstance(tensors, dict):
        raise DCDiTError(f"{what} must be a dict of tensors (a state_dict()), got {type(tensors).__name__}")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DCDiTError(f"{what} must map names to tensors; {bad[0]!r} is a "
                         f"{type(tensors[bad[0]]).__name__}")
    out = {}
    owners: dict[tuple[str, int], int] = {}
    for value in tensors.values():
        if value.numel():
            key = (value.device.type, value.untyped_storage().data_ptr())
            owners[key] = owners.get(key, 0) + 1
    for name, value in tensors.items():
        value = value.detach()
        shared = value.numel() and owners[(value.device.type, value.untyped_storage().data_ptr())] > 1
        view = value.numel() * value.element_size() != value.untyped_storage().nbytes()
        if value.device.type != "cpu":
            value = value.cpu()  # a fresh copy
        elif shared or view or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        out[name] = value.contiguous()
    return out


_PRIMITIVES = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_weights_only(value: Any, where: str) -> None:
    """Refuse what torch.load(weights_only=True) could not read back: only containers, primitives and tensors."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)):
                raise DCDiTError(f"{where} has a key of type {type(key).__name__}; use strings or numbers")
            _check_weights_only(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_weights_only(item, f"{where}[{i}]")
    elif not isinstance(value, _PRIMITIVES):
        raise DCDiTError(f"{where} is a {type(value).__name__}; optimizer.pt holds only tensors, numbers, strings "
                         f"and containers of them (torch.load(weights_only=True) must read it back)")


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary sibling, fsync, then rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform (Windows); the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- load ------------------------------------------------------------------------------------------------------------

def read_manifest(directory: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """The manifest of a complete checkpoint; raises DCDiTError naming the problem otherwise.

    Every listed file must exist with the listed size; with `verify`, its sha256 must match too.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DCDiTError(f"no checkpoint at {directory}: not a directory")
    path = directory / MANIFEST
    manifest = check_manifest(path.read_bytes() if path.exists() else None, directory)

    def size_of(name: str) -> int | None:
        file = directory / name
        return file.stat().st_size if file.is_file() else None

    check_files(manifest, directory, size_of, (lambda name: _sha256(directory / name)) if verify else None)
    return manifest


def check_manifest(raw: bytes | None, where: Any) -> dict[str, Any]:
    """The parsed MANIFEST.json of checkpoint `where` (raw bytes, None when absent): a dcdit manifest of this or an
    older version listing only the checkpoint's own file names (nothing outside its folder)."""
    if raw is None:
        raise DCDiTError(f"incomplete checkpoint {where}: {MANIFEST} is missing (it is written last, so the save "
                         f"did not finish); use an earlier checkpoint (find_latest_checkpoint skips incomplete ones)")
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not _valid_manifest(manifest):
        raise DCDiTError(f"incomplete checkpoint {where}: {MANIFEST} is not a valid dcdit manifest; "
                         f"use an earlier checkpoint")
    if manifest.get("version", 0) > VERSION:
        raise DCDiTError(f"checkpoint {where} has format version {manifest['version']}, newer than this dcdit "
                         f"({VERSION}); upgrade dcdit")
    for name in manifest["files"]:
        if name not in CHECKPOINT_FILES:
            raise DCDiTError(f"checkpoint {where} is corrupt: manifest lists {str(name)[:100]!r}, not a checkpoint "
                             f"file ({', '.join(CHECKPOINT_FILES)})")
    return manifest


def check_files(manifest: dict[str, Any], where: Any, size_of, sha_of=None) -> None:
    """Every file of the manifest is there (`size_of(name)` is not None) with its size and, given `sha_of`, its
    sha256; a DCDiTError names the first that is not."""
    for name, entry in manifest["files"].items():
        size = size_of(name)
        if size is None:
            raise DCDiTError(f"checkpoint {where} is corrupt: {name} is missing; use an earlier checkpoint")
        if size != entry["size"]:
            raise DCDiTError(f"checkpoint {where} is corrupt: {name} has {size} bytes, the manifest says "
                             f"{entry['size']} (truncated?); use an earlier checkpoint")
        if sha_of is not None and sha_of(name) != entry["sha256"]:
            raise DCDiTError(f"checkpoint {where} is corrupt: {name} fails its sha256 check; use an earlier "
                             f"checkpoint")


def _valid_manifest(manifest: Any) -> bool:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files or STATE_FILE not in files:
        return False
    return all(isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
               for e in files.values())


def load_checkpoint(directory: str | os.PathLike, *, verify: bool = True,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`, checking the manifest (and, with `verify`, every sha256).

    Refuses incomplete checkpoints, files that fail their checks, and an optimizer.pt holding pickled code.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory, verify=verify)
    files = manifest["files"]
    device = str(torch.device(map_location))

    def tensors(name: str) -> dict[str, torch.Tensor] | None:
        if name not in files:
            return None
        try:
            return load_file(str(directory / name), device=device)
        except Exception as err:  # safetensors raises its own error type for malformed headers
            raise DCDiTError(f"checkpoint {directory} is corrupt: cannot read {name} ({err})") from None

    optimizer_state = None
    if OPTIMIZER_FILE in files:
        optimizer_state = load_weights_only(directory / OPTIMIZER_FILE, map_location)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        config = json.loads((directory / CONFIG_FILE).read_text()) if CONFIG_FILE in files else None
    except ValueError as err:
        raise DCDiTError(f"checkpoint {directory} is corrupt: invalid JSON ({err})") from None
    check_state(state, config, directory)
    return Checkpoint(path=directory, model_state=tensors(MODEL_FILE), ema_state=tensors(EMA_FILE),
                      optimizer_state=optimizer_state, state=state, config=config, manifest=manifest)


def check_state(state: Any, config: Any, directory: Any) -> None:
    """state.json is an object whose step is a count and whose parts have the types resuming reads."""
    def bad(problem: str) -> DCDiTError:
        return DCDiTError(f"checkpoint {directory} is corrupt: {problem}; use an earlier checkpoint")

    if not isinstance(state, dict):
        raise bad(f"{STATE_FILE} holds a {type(state).__name__}, not an object")
    step = state.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise bad(f"{STATE_FILE} step={str(step)[:40]!r} is not a step count")
    for key in ("rng", "data_cursor", "metrics"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise bad(f"{STATE_FILE} {key} is a {type(state[key]).__name__}, not an object")
    if config is not None and not isinstance(config, dict):
        raise bad(f"{CONFIG_FILE} holds a {type(config).__name__}, not an object")


def is_checkpoint(directory: str | os.PathLike, *, verify: bool = False) -> bool:
    """Whether `directory` holds a complete checkpoint (sizes checked; sha256 too with `verify`)."""
    try:
        read_manifest(directory, verify=verify)
    except DCDiTError:
        return False
    return True


def find_latest_checkpoint(root: str | os.PathLike, *, verify: bool = False) -> Path | None:
    """The highest-numbered complete `checkpoint_<step>` directory under `root`, or None.

    Incomplete ones (no or invalid manifest, missing or truncated files) are skipped, so a save that died
    halfway falls back to the previous checkpoint. `verify` also checks every sha256 (reads every byte).
    """
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [(int(m.group(1)), p) for p in root.iterdir()
                  if p.is_dir() and (m := CHECKPOINT_DIR.fullmatch(p.name))]
    for _, path in sorted(candidates, reverse=True):
        if is_checkpoint(path, verify=verify):
            return path
    return None


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able config (key order does not matter), for state.json."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# --- RNG state -------------------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Every global RNG as JSON-able data: python `random`, numpy's legacy global, torch CPU and every CUDA device."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` captured (after a JSON round trip too)."""
    python = rng["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = rng["numpy"]
    np.random.set_state((numpy["kind"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(_unb64(rng["torch"]))
    cuda = rng.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("the checkpoint holds CUDA RNG states but CUDA is not available; they are not restored",
                          stacklevel=2)
        else:
            count = torch.cuda.device_count()
            if count != len(cuda):
                warnings.warn(f"the checkpoint holds {len(cuda)} CUDA RNG states for {count} visible devices; "
                              f"restoring the first {min(count, len(cuda))}", stacklevel=2)
            for device, state in enumerate(cuda[:count]):
                torch.cuda.set_rng_state(_unb64(state), device)


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "load_weights_only", "read_manifest", "check_manifest",
           "check_files", "check_state",
           "is_checkpoint", "find_latest_checkpoint", "checkpoint_dir", "config_hash", "capture_rng_state",
           "restore_rng_state"]
