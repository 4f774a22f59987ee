"""What the platform says to the person at the terminal, in one place, on the standard `logging` module.

Progress and warnings go to stderr as `dcdit COMMAND: message` lines through the "dcdit" logger (so library users
and tests can raise, lower or capture them like any other logger); stdout is reserved for the one-line JSON summary
that `--json` asks for. User errors are one line and exit code 2 (`cli.main`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable

from dcdit.errors import DCDiTError

ROOT = "dcdit"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the call (pytest's capture and redirect_stdout-style
    swaps replace it after this handler was made)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it; the property decides
        pass


def _root() -> logging.Logger:
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray and MLflow configure the root logger; our lines appear once
    return logger


def logger(command: str) -> logging.Logger:
    """The logger of one command or component ("train", "eval", "sweep", ...)."""
    _root()
    return logging.getLogger(f"{ROOT}.{command}")


def echo(command: str) -> Callable[[str], None]:
    """A function printing `dcdit COMMAND: text` to stderr: what long-running functions take as `echo=`."""
    log = logger(command)
    return lambda text: log.info("dcdit %s: %s", command, text)


def warn(command: str, text: str) -> None:
    logger(command).warning("dcdit %s: warning: %s", command, text)


def error(command: str, text: str) -> None:
    """The one line a user error ends with."""
    logger(command).error("dcdit %s: error: %s", command, text)


_verbosity = {"quiet": False, "verbose": False}


def set_verbosity(*, quiet: bool = False, verbose: bool = False) -> None:
    """`--quiet`: only warnings and errors on stderr (and no output of Ray's workers); `--verbose`: debug lines,
    and Ray's own log lines from its workers too (raycluster.ray_session reads `is_quiet`/`is_verbose`)."""
    _root().setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    _verbosity.update(quiet=quiet, verbose=verbose)


def is_quiet() -> bool:
    return _verbosity["quiet"]


def is_verbose() -> bool:
    return _verbosity["verbose"]


def format_duration(seconds: float) -> str:
    """"45 s", "3 min 20 s", "2 h 05 min": how long something took or will take, to the precision that matters."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def print_json(obj) -> None:
    """The machine-readable summary: one JSON object on the last line of stdout. Its numbers are finite or the
    command fails (NaN and Infinity are not JSON, and a NaN metric is a failed measurement, not a result)."""
    bad = nonfinite_keys(obj)
    if bad:
        raise DCDiTError(f"the result holds non-finite numbers ({', '.join(bad[:4])}); nothing was printed")
    print(json.dumps(obj, sort_keys=True, default=str, allow_nan=False), flush=True)


def nonfinite_keys(obj, path: str = "") -> list[str]:
    """Dotted paths of the NaN or infinite floats in a JSON-like tree."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path or "value"]
    if isinstance(obj, dict):
        return [k for key, value in obj.items() for k in nonfinite_keys(value, f"{path}.{key}" if path else str(key))]
    if isinstance(obj, (list, tuple)):
        return [k for i, value in enumerate(obj) for k in nonfinite_keys(value, f"{path}[{i}]")]
    return []


__all__ = ["logger", "echo", "warn", "error", "set_verbosity", "print_json", "nonfinite_keys", "format_duration",
           "is_quiet", "is_verbose"]
