"""The ``volagent`` command line.

Each subcommand is a :class:`_Command`: a function that adds its arguments and a function that
runs it and returns the exit status. :data:`_COMMANDS` lists them; :func:`main` parses, runs,
and turns a :class:`~volagent.errors.VolagentError` into a message and its exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from volagent import __version__, config
from volagent.errors import EXIT_OK, EXIT_USAGE, ConfigError, VolagentError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")


@dataclass(frozen=True)
class _Command:
    """A subcommand: its name, one-line help, argument setup and handler."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- configcheck


def _configcheck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        nargs="?",
        type=Path,
        help=f"configuration file (default: ${config.ENV_CONFIG} or {config.DEFAULT_PATH})",
    )


def _configcheck(args: argparse.Namespace) -> int:
    path: Path = args.file or config.default_path()
    cfg = config.load(path)
    _out(f"config OK: {path}")
    _out(f"cn: {cfg.cn}")
    _out(f"dataset root: {cfg.storage.dataset_root}")
    _out(f"broker: {cfg.mqtt.url} (client id {cfg.client_id})")
    return EXIT_OK


# ---------------------------------------------------------------- run


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help=f"configuration file (default: ${config.ENV_CONFIG} or {config.DEFAULT_PATH})",
    )


def _run(args: argparse.Namespace) -> int:
    from volagent import daemon, log  # noqa: PLC0415  # the daemon's imports are only for run

    cfg = config.load(args.config or config.default_path())
    log.configure(level=cfg.log.level, fmt=cfg.log.format)
    return asyncio.run(daemon.serve(cfg))


_COMMANDS: tuple[_Command, ...] = (
    _Command(
        name="run",
        help="run the agent: take tasks from the broker and serve the volumes",
        add_arguments=_run_arguments,
        run=_run,
    ),
    _Command(
        name="configcheck",
        help="validate the configuration (file plus VOLAGENT_* overrides) and report every problem",
        add_arguments=_configcheck_arguments,
        run=_configcheck,
    ),
)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="volagent",
        description="Compute-node agent serving shared NFS volumes from ZFS datasets.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"volagent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        sub = commands.add_parser(
            command.name, help=command.help, description=command.help, allow_abbrev=False
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``volagent`` command with ``argv`` (default: ``sys.argv[1:]``); return the status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits after --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except VolagentError as exc:
        _err(f"volagent: {exc.message}")
        if isinstance(exc, ConfigError):
            for key, message in exc.problems:
                _err(f"{key}: {message}")
        return exc.exit_code
