"""A private mosquitto broker per test: own port, config and persistence; stop/restart at will."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.run import sh


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener: the CA that signed the server certificate, and the server's."""

    ca: Path
    cert: Path
    key: Path


class Mosquitto:
    """A mosquitto process on loopback with its own directory.

    ``users`` (name -> password) switches anonymous access off and writes a password file.
    ``extra`` lines are appended to the config (for fault tests); ``reconfigure`` rewrites it.
    ``tls`` makes the listener speak TLS only (``url`` becomes ``mqtts://``; ``pub``/``sub``
    trust ``tls.ca``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        extra: list[str] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.users = dict(users or {})
        self.extra = list(extra or [])
        self.tls = tls
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        """The broker's URL in the agent's config syntax."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "user root",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            f"log_dest file {self.log}",
            "log_type all",
            "max_queued_messages 100000",
        ]
        if self.tls:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
            ]
        if self.users:
            pwfile = self.dir / "passwd"
            pwfile.unlink(missing_ok=True)
            for name, password in self.users.items():
                flags = ["-b", "-c"] if not pwfile.exists() else ["-b"]
                sh(["mosquitto_passwd", *flags, str(pwfile), name, password])
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join([*lines, *self.extra]) + "\n")

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with (self.dir / "stderr.log").open("ab") as stderr:
            self.proc = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if self.proc.poll() is not None:
                msg = f"mosquitto exited {self.proc.returncode}: see {self.log}"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                msg = f"mosquitto not listening on {self.port} after 10s"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the broker cleanly (it saves its persistence file on the way out)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """Stop then start on the same port with the same persistence."""
        self.stop()
        self.start()

    def reconfigure(
        self, *, users: dict[str, str] | None = None, extra: list[str] | None = None
    ) -> None:
        """Rewrite the config; takes effect at the next (re)start."""
        if users is not None:
            self.users = dict(users)
        if extra is not None:
            self.extra = list(extra)
        self._write_config()

    def pub(
        self, topic: str, payload: str, *, retain: bool = False, auth: dict[str, str] | None = None
    ) -> None:
        """Publish with the real ``mosquitto_pub`` client (QoS 1)."""
        argv = ["mosquitto_pub", "-p", str(self.port), "-h", "127.0.0.1", "-q", "1"]
        if len(payload) > 64 * 1024:  # beyond what one argument may hold: a file instead
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                f.write(payload)
            argv += ["-t", topic, "-f", f.name]
        else:
            argv += ["-t", topic, "-m", payload]
        if retain:
            argv.append("-r")
        argv += self._auth_args(auth) + self._tls_args()
        sh(argv, timeout=20)

    def sub(
        self,
        topic: str,
        *,
        count: int,
        timeout: float = 10,
        auth: dict[str, str] | None = None,
        session: str | None = None,
    ) -> list[str]:
        """Receive ``count`` messages with the real ``mosquitto_sub`` client.

        ``session`` is a client id whose persistent session (see :meth:`open_session`) holds
        what was published since it was opened.
        """
        argv = ["mosquitto_sub", "-p", str(self.port), "-h", "127.0.0.1", "-q", "1"]
        argv += ["-t", topic, "-C", str(count), "-W", str(int(timeout))]
        argv += self._auth_args(auth) + self._tls_args() + self._session_args(session)
        return sh(argv, timeout=timeout + 10).splitlines()

    def open_session(self, topic: str, session: str, *, auth: dict[str, str] | None = None) -> None:
        """Subscribe a persistent ``mosquitto_sub`` session and leave: the broker queues for it."""
        argv = ["mosquitto_sub", "-p", str(self.port), "-h", "127.0.0.1", "-q", "1"]
        argv += ["-t", topic, "-E"]
        argv += self._auth_args(auth) + self._tls_args() + self._session_args(session)
        sh(argv, timeout=20)

    def _tls_args(self) -> list[str]:
        return ["--cafile", str(self.tls.ca)] if self.tls else []

    @staticmethod
    def _session_args(session: str | None) -> list[str]:
        return ["-i", session, "-c"] if session else []

    @staticmethod
    def _auth_args(auth: dict[str, str] | None) -> list[str]:
        if not auth:
            return []
        return ["-u", auth["username"], "-P", auth["password"]]

    def close(self) -> None:
        """Stop the broker; its directory belongs to pytest's tmp_path."""
        with contextlib.suppress(Exception):
            self.stop()
