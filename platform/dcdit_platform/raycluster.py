"""Where a command's Ray comes from: the cluster named by `--address`, the cluster of the Ray job the command runs
in (`ray job submit` sets RAY_ADDRESS), or else an embedded local cluster that lives as long as the command.

Every command (train, eval, sweep, prepare-data, quickstart) goes through `ray_session`, so they agree on that rule.
A plain `ray.init()` would instead attach to whatever `ray start` cluster it finds on the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
from collections.abc import Iterator
from typing import Any

import ray
import ray.data
from ray._private import ray_logging

from dcdit.errors import DCDiTError
from dcdit_platform import console

# Ray Train V2's placement-group cleaner finds the State API by auto-detecting "the" Ray of its machine, which fails
# when several run there (tests, shared hosts). An embedded cluster with a dashboard points it at its own.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"

# free_port's ports: above Ray's worker ports (10002-19999 by default), below Linux's ephemeral range (32768-60999,
# what bind(0) and outgoing connections get), so neither Ray nor the kernel hands one out on its own.
PORT_RANGE = (20000, 32768)
_held_ports: list[socket.socket] = []  # the lock sockets of the ports handed out, open until the process ends

TOKEN_HINT = ("with token authentication (on by default since Ray 2.59) set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
              "or RAY_AUTH_TOKEN_PATH")


def target_address(address: str | None) -> str | None:
    """The cluster a command attaches to, or None for an embedded local one."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
                **init_kwargs: Any) -> Iterator[bool]:
    """Attach to `address` (or RAY_ADDRESS), or start an embedded local Ray with `num_cpus` (default: all cores).

    Yields whether this call attached or started Ray (it is then shut down on exit); a Ray already initialised in
    this process (a sweep's trial, a test) is reused and left running. Connection failures are one DCDiTError."""
    if ray.is_initialized():
        yield False
        return
    target = target_address(address)
    saved = os.environ.get(API_SERVER_ENV)
    if console.is_quiet():  # scripts: not even the workers' lines (they stay in Ray's session logs)
        init_kwargs["log_to_driver"] = False
    try:
        if target:
            context = ray.init(address=target, logging_level="warning", **init_kwargs)
        else:
            local: dict[str, Any] = {"include_dashboard": dashboard}
            if dashboard:
                port = free_port()
                # Set before ray.init so the raylet, and every worker it starts, inherits it.
                os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
                local.update(dashboard_host="127.0.0.1", dashboard_port=port)
            context = ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                               logging_level="warning", **local, **init_kwargs)
    except Exception as err:  # noqa: BLE001 - connection problems come in many types
        _restore_env(API_SERVER_ENV, saved)
        where = f"the Ray cluster at {target}" if target else "a local Ray"
        raise DCDiTError(f"cannot start or connect to {where}: {' '.join(str(err).split())[:200]} ({TOKEN_HINT})"
                         ) from None
    if not console.is_verbose():
        hide_ray_internal_lines()
    if getattr(context, "dashboard_url", None) and (dashboard or target):
        console.logger("ray").info("dcdit: Ray dashboard at http://%s (while this command runs)",
                                   context.dashboard_url)
    try:
        yield True
    finally:
        ray.shutdown()
        _restore_env(API_SERVER_ENV, saved)


@contextlib.contextmanager
def ray_data_settings(**execution_options: Any) -> Iterator[None]:
    """Ray Data's progress bars and log lines on the terminal only with --verbose (commands print their own
    progress; the dashboard's Data view shows Ray Data's), and `execution_options` (preserve_order=True, ...) for
    the datasets run inside the block; the previous settings come back on exit."""
    ctx = ray.data.DataContext.get_current()
    data_logger = logging.getLogger("ray.data")
    options = ctx.execution_options
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, data_logger.level,
             {name: getattr(options, name) for name in execution_options})
    ctx.enable_progress_bars = ctx.print_on_execution_start = console.is_verbose()
    if not console.is_verbose():
        data_logger.setLevel(logging.ERROR)
    for name, value in execution_options.items():
        setattr(options, name, value)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, level, previous = saved
        data_logger.setLevel(level)
        for name, value in previous.items():
            setattr(options, name, value)


# What Ray's C++ core writes to a worker's stderr ("[2026-11-30 14:18:07,293 E 3349 3408] core_worker.cc:2465: Actor
# with class name: 'PreemptionWatcher' ...") and Ray Train's record of every report ("Reporting training result 1:
# TrainingReport(...)"): Ray's business, not the user's, but forwarded to the driver with the workers' own output.
RAY_INTERNAL_LINE = re.compile(r"\s*(?:\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z] \d+ \d+\] [\w./-]+\.(?:cc|h):\d+:"
                               r"|Reporting training result \d+: TrainingReport\()")


def hide_ray_internal_lines() -> None:
    """Keep Ray's internal log lines (RAY_INTERNAL_LINE) out of this driver's terminal; they stay in the session's
    worker-*.err files. Ray prints the workers' forwarded output through one handler of its stdstream dispatcher
    (no public hook exists): it is wrapped once with a filter. Does nothing when Ray forwards no worker output."""
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs" or getattr(handler, "hides_ray_lines", False):
            continue

        def filtered(data: dict, _print=handler) -> None:
            lines = [line for line in data.get("lines", []) if not RAY_INTERNAL_LINE.match(line)]
            if lines:
                _print({**data, "lines": lines})

        filtered.hides_ray_lines = True
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


def free_port() -> int:
    """A TCP port on 127.0.0.1 for a server this process starts, that no other process can be handed meanwhile.

    Binding port 0 and releasing it races: the kernel hands the same port to the next bind(0) or outgoing
    connection. Here the port lies outside the kernel's ephemeral range and Ray's worker ports, and an abstract
    Unix socket named after it, held until this process exits (no file to clean up), keeps every other free_port
    caller off it; the TCP bind only checks that no foreign process serves on it."""
    low, high = PORT_RANGE
    start = random.randrange(low, high)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0dcdit-port-{port}")  # one name per network namespace: taken until closed
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            lock.close()
            continue
        _held_ports.append(lock)
        return port
    raise DCDiTError(f"no free TCP port in {low}-{high - 1} on 127.0.0.1: close some servers and retry")


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


__all__ = ["API_SERVER_ENV", "free_port", "ray_data_settings", "ray_session", "target_address"]
