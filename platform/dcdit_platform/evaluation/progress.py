"""Progress of long work as the person at the terminal sees it: a line each time another tenth is done, with the
count, the percentage and an ETA from the rate so far (count-based, so the lines are the same on any machine),
and an optional callback that records the same numbers elsewhere (MLflow metrics).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dcdit_platform.console import format_duration


class Progress:
    """`advance(n)` after each finished piece of `total`; prints "WHAT done/total (p%), ETA ..." on `echo` when
    the count enters a new tenth, and "... done in ..." at the end. `on_update(done, eta_s)` gets every printed
    update (eta_s = 0 at the end)."""

    def __init__(self, total: int, what: str, echo: Callable[[str], None], *,
                 on_update: Callable[[int, float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.what, self.echo, self.on_update, self.clock = max(int(total), 1), what, echo, on_update, clock
        self.started = clock()
        self.done = 0
        self.next_tenth = 1

    def advance(self, n: int) -> None:
        self.done = min(self.done + int(n), self.total)
        tenth = self.done * 10 // self.total
        if tenth < self.next_tenth:
            return
        self.next_tenth = tenth + 1
        elapsed = self.clock() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        head = f"{self.what} {self.done}/{self.total} ({100 * self.done // self.total}%)"
        self.echo(f"{head}, ETA {format_duration(eta)}" if self.done < self.total
                  else f"{head} in {format_duration(elapsed)}")
        if self.on_update is not None:
            self.on_update(self.done, eta)


__all__ = ["Progress"]
