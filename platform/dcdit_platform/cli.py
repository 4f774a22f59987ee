"""The `dcdit` command: one sub-command per module, user errors as one line and a non-zero exit.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` to a callable taking
the parsed arguments and returning the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from dcdit.errors import DCDiTError
from dcdit_platform import console

# Modules under dcdit_platform.commands, in the order `dcdit --help` lists them.
COMMAND_MODULES = ("flops", "bench", "data", "train", "evaluate", "sample", "export", "register", "fid", "sweep",
                   "report", "quickstart", "study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcdit", description="Dynamic Chunking Diffusion Transformers platform")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"dcdit_platform.commands.{name}").register(subparsers)
    for command in subparsers.choices.values():  # every command takes them, after its own arguments
        loudness = command.add_mutually_exclusive_group()
        loudness.add_argument("--quiet", action="store_true",
                              help="print only warnings, errors and the result (for scripts)")
        loudness.add_argument("--verbose", action="store_true",
                              help="print debug lines and Ray's own log lines from its workers too")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.set_verbosity(quiet=args.quiet, verbose=args.verbose)
    # SIGTERM (a scheduler stopping the job) ends a command as Ctrl-C does: runs are closed as KILLED, not left
    # RUNNING. Signal handlers can only be set from the main thread (tests call main() from others).
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        return int(args.func(args) or 0)
    except DCDiTError as err:
        console.error(args.command, str(err))
        return 2
    except KeyboardInterrupt:
        console.echo(args.command)("interrupted")
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
