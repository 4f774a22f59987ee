"""What every MLflow run is tagged with: the code's version and git commit (dirty or not), the host, and MLflow's
own user and source tags, which its low-level client leaves unset (the UI's User and Source columns).
"""

from __future__ import annotations

import functools
import getpass
import socket
import subprocess
import sys
from pathlib import Path

import dcdit


@functools.lru_cache(maxsize=1)
def code_tags() -> dict[str, str]:
    """Code version, git commit (and whether the tree is dirty), host, user and source (MLflow's own tags, which
    its low-level client leaves unset: the UI's User and Source columns), for every run."""
    tags = {"dcdit.version": getattr(dcdit, "__version__", "unknown"), "dcdit.host": socket.gethostname(),
            "mlflow.user": _user(), "mlflow.source.name": _source_name(), "mlflow.source.type": "LOCAL"}
    repo = Path(dcdit.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        tags["dcdit.git_commit"] = tags["mlflow.source.git.commit"] = commit
        tags["dcdit.git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    else:
        tags["dcdit.git_commit"] = "unknown"
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return "unknown"


def _source_name() -> str:
    """`dcdit train` for the CLI (its sub-command named), else the script that started the process."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "dcdit" and len(sys.argv) > 1:
        return f"dcdit {sys.argv[1]}"
    return program


__all__ = ["code_tags"]
