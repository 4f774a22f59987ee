"""The one user-facing error type of the project.

Anything a user can fix (a bad config key, a wrong shape, a corrupt checkpoint, missing weights) raises
`DCDiTError` with a one-line message naming the problem and the fix; the CLI prints it without a traceback.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable


class DCDiTError(Exception):
    """A problem the user can fix; the message says what and how."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters without first building the repr of a
    huge or deeply shared structure (a YAML alias bomb would exhaust memory there)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, limit, limit
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = 4
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

