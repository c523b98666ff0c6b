"""The ``volagent`` command line.

Each subcommand is a :class:`_Command`: a function that adds its arguments and a function that
runs it and returns the exit status. :data:`_COMMANDS` lists them (``task`` has commands of its
own, :data:`_TASK_COMMANDS`); :func:`main` parses, runs, and turns a
:class:`~volagent.errors.VolagentError` into a message and its exit status. The commands here
are thin: ``status``, ``task submit`` and ``doctor`` live in :mod:`volagent.cli_status`,
:mod:`volagent.cli_submit` and :mod:`volagent.cli_doctor`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from volagent import __version__, config, log
from volagent.domain.tasks import TASK_KINDS
from volagent.errors import EXIT_OK, EXIT_USAGE, ConfigError, VolagentError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: The shells' status for a command ended by SIGINT (128 + 2).
_EXIT_INTERRUPTED: Final = 130


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


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help=f"configuration file (default: ${config.ENV_CONFIG} or {config.DEFAULT_PATH})",
    )


def _run(args: argparse.Namespace) -> int:
    from volagent import daemon  # noqa: PLC0415  # the daemon's imports are only for run

    cfg = config.load(args.config or config.default_path())
    log.configure(level=cfg.log.level, fmt=cfg.log.format)
    return asyncio.run(daemon.serve(cfg))


# ---------------------------------------------------------------- status, task submit, doctor


def _quiet() -> None:
    """Log errors only, to stderr: these commands report what they find themselves."""
    log.configure(level="error")


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print /status and /ready as JSON")


def _status(args: argparse.Namespace) -> int:
    from volagent import cli_status  # noqa: PLC0415  # aiohttp is imported only when needed

    cfg = config.load(args.config or config.default_path())
    _quiet()
    return asyncio.run(cli_status.status_command(cfg.http, as_json=args.json, out=sys.stdout))


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _submit_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("kind", help=f"the task kind: {', '.join(TASK_KINDS)}")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter; VALUE is JSON when it parses (64, true, [..], {..}) else a string;"
        " a dotted KEY (nic.ip=10.0.0.5) builds nested objects; repeat for more",
    )
    parser.add_argument("--id", help="the task id (default: a new random UUID)")
    parser.add_argument(
        "--deadline-s",
        type=_positive_seconds,
        metavar="N",
        help="the task fails with DeadlineExceeded unless started within N seconds",
    )
    parser.add_argument(
        "--follow", action="store_true", help="print the task's events until it ends"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=600.0,
        metavar="S",
        help="give up after S seconds, broker connection included (default: 600)",
    )


def _submit(args: argparse.Namespace) -> int:
    from volagent import cli_submit  # noqa: PLC0415  # aiomqtt is imported only when needed

    cfg = config.load(args.config or config.default_path())
    task = cli_submit.build_task(
        cfg,
        args.kind,
        cli_submit.parse_params(args.param),
        now=datetime.now(UTC),
        task_id=args.id,
        deadline_s=args.deadline_s,
    )
    _quiet()
    return asyncio.run(
        cli_submit.submit(cfg, task, follow=args.follow, timeout_s=args.timeout, out=sys.stdout)
    )


_TASK_COMMANDS: tuple[_Command, ...] = (
    _Command(
        name="submit",
        help="publish a task for this node (and follow its events)",
        add_arguments=_submit_arguments,
        run=_submit,
    ),
)


def _add_commands(
    parser: argparse.ArgumentParser, commands: Sequence[_Command], *, dest: str, run: str
) -> None:
    """One subcommand per command; the parsed arguments carry its function under ``run``."""
    subparsers = parser.add_subparsers(dest=dest, metavar="COMMAND", required=True)
    for command in commands:
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.help, allow_abbrev=False
        )
        command.add_arguments(sub)
        sub.set_defaults(**{run: command.run})


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    _add_commands(parser, _TASK_COMMANDS, dest="task_command", run="task_run")


def _task(args: argparse.Namespace) -> int:
    run: Callable[[argparse.Namespace], int] = args.task_run
    return run(args)


def _doctor(args: argparse.Namespace) -> int:
    from volagent import cli_doctor  # noqa: PLC0415  # the checks' imports only when needed

    _quiet()
    return asyncio.run(
        cli_doctor.doctor_command(args.config or config.default_path(), out=sys.stdout)
    )


_COMMANDS: tuple[_Command, ...] = (
    _Command(
        name="run",
        help="run the agent: take tasks from the broker and serve the volumes",
        add_arguments=_config_argument,
        run=_run,
    ),
    _Command(
        name="configcheck",
        help="validate the configuration (file plus VOLAGENT_* overrides) and report every problem",
        add_arguments=_configcheck_arguments,
        run=_configcheck,
    ),
    _Command(
        name="status",
        help="show the running agent's status and readiness (from its local HTTP API)",
        add_arguments=_status_arguments,
        run=_status,
    ),
    _Command(
        name="task",
        help="work with tasks: task submit KIND --param k=v ... [--follow]",
        add_arguments=_task_arguments,
        run=_task,
    ),
    _Command(
        name="doctor",
        help="check what the agent needs on this node and say how to fix what is wrong",
        add_arguments=_config_argument,
        run=_doctor,
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
    _add_commands(parser, _COMMANDS, dest="command", run="run")
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
    except KeyboardInterrupt:  # Ctrl-C in status, task submit --follow or doctor
        _err("volagent: interrupted")
        return _EXIT_INTERRUPTED
