"""The run layout on storage, read and written by training, evaluation, sweeps and reports alike:

    {storage}/{run}/dcdit_run.json            the run record (config, science, hash, MLflow run id)
    {storage}/{run}/checkpoint_00001000/      a checkpoint (dcdit.checkpoint's contract: MANIFEST.json last)

A checkpoint counts only when its manifest lists files of the recorded sizes, so a half-uploaded one is skipped.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dcdit.checkpoint import (CHECKPOINT_DIR, MANIFEST, STATE_FILE, check_files, check_manifest, check_state,
                              find_latest_checkpoint, load_checkpoint)
from dcdit.config import ModelConfig
from dcdit.errors import DCDiTError
from dcdit.models import build_model
from dcdit.safeload import shape_mismatch
from dcdit_platform.config import build_config
from dcdit_platform.secrets import strip_redacted
from dcdit_platform.storage import StorageError, open_storage

RUN_RECORD = "dcdit_run.json"  # in {storage}/{name}/: what `dcdit resume NAME` needs to rebuild the run


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at `step`; the same pattern as dcdit.checkpoint.checkpoint_dir."""
    return f"checkpoint_{step:08d}"


def read_run_record(storage, name: str) -> dict | None:
    """The record `dcdit train` wrote for run `name` (config, hash, MLflow run id), or None."""
    try:
        return storage.child(name).read_json(RUN_RECORD)
    except FileNotFoundError:
        return None


def write_run_record(storage, name: str, record: dict) -> None:
    storage.child(name).write_json(RUN_RECORD, record)


def complete_checkpoints(run_dir, *, newest_first: bool = True) -> Iterator[tuple[str, dict]]:
    """(directory name, state.json) of every checkpoint in a run folder on any storage that passes
    `verify_checkpoint`'s size checks, newest first (oldest first with newest_first=False)."""
    try:
        names = sorted((n for n in run_dir.listdir() if CHECKPOINT_DIR.fullmatch(n)), reverse=newest_first)
    except FileNotFoundError:
        return
    for dirname in names:
        try:
            state = verify_checkpoint(run_dir, dirname, sha256=False)
        except DCDiTError:
            continue
        yield dirname, state


def latest_checkpoint_state(run_dir) -> tuple[str, dict] | None:
    """(directory name, state.json) of the newest complete checkpoint in a run folder on any storage (every file
    there with its manifest size; `newest_checkpoint` also checks their sha256)."""
    return newest_checkpoint(run_dir, verify=False)[0]


def newest_checkpoint(run_dir, *, verify: bool = True,
                      at_least: int = 0) -> tuple[tuple[str, dict] | None, list[tuple[str, str]]]:
    """((directory name, state.json) of the newest checkpoint of step >= `at_least` that passes its checks, or
    None) and the newer ones skipped, each with why. `verify` reads every file for its sha256 (the driver picks
    the checkpoint workers resume from this way); without it, sizes are checked."""
    try:
        names = sorted((n for n in run_dir.listdir() if CHECKPOINT_DIR.fullmatch(n)), reverse=True)
    except FileNotFoundError:
        return None, []
    skipped = []
    for dirname in names:
        if int(CHECKPOINT_DIR.fullmatch(dirname).group(1)) < at_least:
            break
        try:
            return (dirname, verify_checkpoint(run_dir, dirname, sha256=verify)), skipped
        except DCDiTError as err:
            if isinstance(err, StorageError) and err.transient:
                raise  # the storage is failing, not this checkpoint
            skipped.append((dirname, str(err)))
    return None, skipped


def verify_checkpoint(run_dir, dirname: str, *, sha256: bool = True) -> dict:
    """state.json of checkpoint `dirname` of a run folder on any storage, after dcdit.checkpoint's checks of its
    manifest, files (sizes, and sha256 with `sha256`) and state; DCDiTError naming the problem otherwise."""
    where = run_dir.join(dirname)
    try:
        raw = run_dir.read_bytes(f"{dirname}/{MANIFEST}")
    except FileNotFoundError:
        raw = None
    manifest = check_manifest(raw, where)

    def size_of(name: str) -> int | None:
        try:
            return run_dir.size(f"{dirname}/{name}")
        except FileNotFoundError:
            return None

    check_files(manifest, where, size_of, (lambda name: run_dir.sha256(f"{dirname}/{name}")) if sha256 else None)
    state = run_dir.read_json(f"{dirname}/{STATE_FILE}")
    check_state(state, None, where)
    return state


@dataclass
class LoadedCheckpoint:
    uri: str
    dirname: str
    run_name: str | None
    step: int | None
    mlflow_run_id: str | None
    config: Any  # ExperimentConfig
    state: dict
    weights: dict[str, torch.Tensor]
    used_ema: bool
    storage_root: str | None  # the training storage the checkpoint lives in, when recognisable


def open_checkpoint(uri: str) -> LoadedCheckpoint:
    """The checkpoint at `uri` (a checkpoint directory or a run directory: its latest complete checkpoint), with
    its config rebuilt and the weights to sample from (EMA when present)."""
    storage = open_storage(uri)
    if not storage.exists(MANIFEST):
        names = sorted((n for n in storage.listdir() if CHECKPOINT_DIR.fullmatch(n)), reverse=True)
        if not names:
            raise DCDiTError(f"no checkpoint at {uri}: expected a checkpoint directory (with {MANIFEST}) or a run "
                             "directory holding checkpoint_* directories")
        if storage.is_local:
            latest = find_latest_checkpoint(storage.root)
            if latest is None:
                raise DCDiTError(f"{uri} holds no complete checkpoint")
            storage = open_storage(str(latest))
        else:
            latest = latest_checkpoint_state(storage)
            if latest is None:
                raise DCDiTError(f"{uri} holds no complete checkpoint")
            storage = storage.child(latest[0])
    with contextlib.ExitStack() as stack:
        local = storage.root
        if not storage.is_local:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="dcdit-eval-ckpt-"))
            storage.download("", tmp)
            local = tmp
        ckpt = load_checkpoint(local)
    if ckpt.config is None:
        raise DCDiTError(f"checkpoint {storage.uri} has no config.json: it was not written by `dcdit train`")
    try:
        config = build_config(strip_redacted(ckpt.config))
    except DCDiTError as err:
        raise DCDiTError(f"checkpoint {storage.uri} holds an invalid config: {err}") from None
    weights, used_ema = (ckpt.ema_state, True) if ckpt.ema_state is not None else (ckpt.model_state, False)
    if not used_ema:
        warnings.warn(f"checkpoint {storage.uri} has no EMA weights; evaluating the raw model weights", stacklevel=2)
    weights = {_strip_prefix(k): v for k, v in weights.items()}
    check_model_weights(weights, config.model, f"checkpoint {storage.uri}")
    dirname = storage.uri.rstrip("/").rsplit("/", 1)[-1]
    parent = storage.uri.rstrip("/").rsplit("/", 1)[0]
    run_parent = parent.rsplit("/", 1)[0] if "/" in parent else None
    run_name = ckpt.state.get("run_name") or config.name
    storage_root = None
    if run_parent is not None and run_name and parent.rstrip("/").endswith("/" + run_name):
        storage_root = run_parent
    return LoadedCheckpoint(uri=storage.uri, dirname=dirname, run_name=run_name, step=ckpt.step,
                            mlflow_run_id=ckpt.state.get("mlflow_run_id"), config=config, state=ckpt.state,
                            weights=weights, used_ema=used_ema, storage_root=storage_root)


def check_model_weights(weights: dict[str, torch.Tensor], model: ModelConfig, where: str) -> None:
    """The weights are those of the model its config describes (every name and shape, built on the meta device):
    checked where the checkpoint is opened, before any actor or worker loads them."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(model).state_dict().items()}
    problem = shape_mismatch(weights, expected)
    if problem:
        raise DCDiTError(f"{where} holds the weights of another model than its config.json describes "
                         f"(model.arch={model.arch}: {problem}); its files were mixed up or edited")


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


__all__ = ["RUN_RECORD", "checkpoint_name", "read_run_record", "write_run_record", "complete_checkpoints",
           "latest_checkpoint_state", "LoadedCheckpoint", "open_checkpoint"]
