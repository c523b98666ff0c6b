"""The demo's only ways in: the ``volagent`` command line and NFS clients in client namespaces.

:class:`Cli` runs ``volagent task submit KIND --param k=v ... --follow`` and ``volagent
status`` against the demo's configuration; :class:`Nfs` runs ``nfs-cp``, ``nfs-cat`` and
``nfs-ls`` (libnfs-utils) inside a client's network namespace, so they come from its address.
Both go through :mod:`volagent.adapters.proc` and return what the command printed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from volagent.adapters import proc
from volagent.errors import CommandError

__all__ = ["Cli", "Nfs", "TaskOutcome"]

#: How long the CLI follows one task (a zone start or stop takes seconds).
TASK_TIMEOUT_S: Final = 120.0
_NFS_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class TaskOutcome:
    """How a task ended: its event lines, and its result (succeeded) or error (failed)."""

    ok: bool
    events: list[str]
    body: Any

    @property
    def error_code(self) -> str:
        """The error code of a failed task ("" when it succeeded)."""
        return "" if self.ok or not isinstance(self.body, dict) else str(self.body.get("code"))


class Cli:
    """``volagent`` with the demo's configuration."""

    def __init__(self, volagent: Path, config: Path) -> None:
        """Run ``volagent`` (the venv's console script) with ``--config config``."""
        self._volagent = volagent
        self._config = config

    @staticmethod
    def submit_argv(kind: str, params: Mapping[str, str]) -> list[str]:
        """``volagent task submit`` as a person types it (without ``--config``)."""
        argv = ["volagent", "task", "submit", kind, "--follow"]
        for key, value in params.items():
            argv += ["--param", f"{key}={value}"]
        return argv

    def _full(self, argv: Sequence[str]) -> list[str]:
        return [str(self._volagent), *argv[1:], "--config", str(self._config)]

    async def submit(self, kind: str, params: Mapping[str, str]) -> TaskOutcome:
        """Publish a task, follow it to its end; its outcome.

        Raises :class:`CommandError` when the CLI could not deliver or follow the task
        (invalid input, no broker, no terminal event in time).
        """
        argv = [*self.submit_argv(kind, params), "--timeout", f"{TASK_TIMEOUT_S:g}"]
        done = await proc.run(self._full(argv), timeout=TASK_TIMEOUT_S + 15, check=False)
        lines = done.text.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith(("{", "null"))), None)
        if done.returncode not in (0, 1) or start is None:
            raise CommandError(
                f"volagent task submit {kind} exited {done.returncode}: {done.stderr.strip()}",
                argv=done.argv,
                returncode=done.returncode,
                stderr=done.stderr,
                stdout=done.text,
            )
        body = json.loads("\n".join(lines[start:]))
        return TaskOutcome(ok=done.returncode == 0, events=lines[:start], body=body)

    async def status(self) -> str:
        """The agent's status table (``volagent status``)."""
        done = await proc.run(self._full(["volagent", "status"]), timeout=20)
        return done.text


class Nfs:
    """NFS clients run inside network namespaces, acting as an ordinary user (uid ``uid``)."""

    def __init__(self, uid: int) -> None:
        """Clients send ``uid``/``gid`` ``uid`` in their credentials (root would be squashed)."""
        self._uid = uid

    def url(self, ip: str, export: str, file: str = "") -> str:
        """An NFSv3 URL of a file (or the export's root) on the server at ``ip``."""
        path = f"{export.rstrip('/')}/{file}" if file else export
        return f"nfs://{ip}{path}?version=3&uid={self._uid}&gid={self._uid}"

    @staticmethod
    def argv(ns: str, tool: str, *args: str) -> list[str]:
        """``ip netns exec NS TOOL ARGS...``: the tool runs with the namespace's address."""
        return ["ip", "netns", "exec", ns, tool, *args]

    async def run(self, ns: str, tool: str, *args: str) -> proc.Completed:
        """Run a client tool in ``ns``; its result, whatever its exit status."""
        return await proc.run(self.argv(ns, tool, *args), timeout=_NFS_TIMEOUT_S, check=False)
