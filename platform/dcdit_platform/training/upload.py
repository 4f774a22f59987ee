"""Where a checkpoint goes between a worker and storage: a staging folder on the worker's machine, kept until the
upload succeeds; the upload (every file, MANIFEST.json last, retried with back-off while storage errors are
transient, up to `checkpoint.upload_timeout_s`); the lease that keeps workers of a replaced driver from writing;
and the clean-up, on the next start, of what a killed or failed run left in staging.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from dcdit.checkpoint import CHECKPOINT_DIR, MANIFEST, is_checkpoint
from dcdit.errors import DCDiTError
from dcdit_platform.storage import StorageError

LEASE = "dcdit_lease.json"  # in {storage}/{run}/: which driver start owns the run now
MAX_DELAY_S = 30.0


class LeaseLost(DCDiTError):
    """Another driver has started this run since this worker group was launched."""


def staging_root(run_uri: str, name: str) -> Path:
    """This machine's staging folder of one run: {tmp}/dcdit-staging/{name}-{8 hex of the run's URI}."""
    digest = hashlib.sha256(run_uri.encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / "dcdit-staging" / f"{name}-{digest}"


def write_lease(run) -> str:
    """Claim run folder `run` (a Storage) for this driver start; returns the token its workers carry."""
    token = uuid.uuid4().hex
    run.write_json(LEASE, {"lease": token, "host": socket.gethostname(), "pid": os.getpid(), "since_unix": time.time()})
    return token


def check_lease(run, token: str) -> None:
    """Raise LeaseLost when a later driver start holds the run (its workers own the checkpoints now)."""
    if not token:
        return
    try:
        held = run.read_json(LEASE).get("lease")
    except FileNotFoundError:  # s3fs reports some connection failures so; only another token is a takeover
        return
    if held != token:
        raise LeaseLost(f"run {run.uri} was started again by another driver; this worker group stops without "
                        "writing")


def upload_checkpoint(local: Path, run, dirname: str, *, lease: str, timeout_s: float,
                      warn: Callable[[str], None] | None = None) -> None:
    """Copy checkpoint folder `local` to `dirname` in run folder `run`: whatever an interrupted save left there is
    removed, then every file, then MANIFEST.json, so the checkpoint exists only once complete. Transient storage
    errors are retried with back-off (1 s doubling to 30 s) for `timeout_s`; after that, or on a permanent error, a
    StorageError says where the checkpoint is kept (`local` is left in place)."""
    files = sorted(p.name for p in local.iterdir() if p.name != MANIFEST)
    started = time.monotonic()
    delay, warned = 1.0, False
    while True:
        try:
            check_lease(run, lease)
            run.delete(dirname)
            run.makedirs(dirname)
            for name in files:
                run.upload(str(local / name), f"{dirname}/{name}")
            check_lease(run, lease)
            run.upload(str(local / MANIFEST), f"{dirname}/{MANIFEST}")
            return
        except StorageError as err:
            waited = time.monotonic() - started
            if not err.transient or waited + delay > timeout_s:
                how = f"after retrying for {waited:.0f} s" if err.transient else "(not a transient error)"
                message = (f"{dirname} was not saved {how}: {err}. Its files are kept on {socket.gethostname()} in "
                           f"{local}; `dcdit resume` on that machine uploads them once the storage works")
                unsent_marker(local).write_text(message)
                raise StorageError(message, transient=False) from None
            if warn is not None and not warned:
                warn(f"cannot write {dirname} yet ({err}); retrying for up to {timeout_s:.0f} s")
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)


def unsent_marker(staged: Path) -> Path:
    """The file next to a staged checkpoint that says its upload gave up (outside the folder, never uploaded)."""
    return staged.with_name(f"{staged.name}.unsent")


def _unsent(root: Path, newer_than: int) -> list[tuple[int, Path]]:
    """Complete staged checkpoints whose upload gave up, newer than step `newer_than`, newest first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_DIR.fullmatch(p.name))]
    return sorted(((step, p) for step, p in found if step > newer_than and unsent_marker(p).is_file()
                   and is_checkpoint(p, verify=True)), reverse=True)


def recover_staged(run, root: Path, newest_step: int, *, timeout_s: float,
                   echo: Callable[[str], None]) -> bool:
    """At a driver start on this machine: upload the newest staged checkpoint whose upload gave up, if it is newer
    than storage's, then remove the run's staging folder with whatever killed workers left there (their
    half-written or never-sent checkpoints are not results). Returns whether a checkpoint was uploaded."""
    if not root.is_dir():
        return False
    unsent = _unsent(root, newest_step)
    if unsent:
        path = unsent[0][1]
        echo(f"uploading {path.name}, kept in {path} after a storage failure")
        upload_checkpoint(path, run, path.name, lease="", timeout_s=timeout_s, warn=echo)
    shutil.rmtree(root, ignore_errors=True)
    return bool(unsent)


def prune_staging(root: Path, step: int) -> None:
    """Remove this machine's staging of the run (at a worker's start and end) except checkpoints newer than `step`
    whose upload gave up: the only copy of those steps, which the next driver start on this machine uploads."""
    if not root.is_dir():
        return
    keep = {p for _, p in _unsent(root, step)} | {unsent_marker(p) for _, p in _unsent(root, step)}
    for path in root.iterdir():
        if path in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):  # {tmp}/dcdit-staging itself, once no run stages there
            root.parent.rmdir()


__all__ = ["LEASE", "LeaseLost", "staging_root", "write_lease", "check_lease", "upload_checkpoint",
           "unsent_marker", "recover_staged", "prune_staging"]
