"""A bare nfs-ganesha inside a test namespace, to prove the test bed (not the agent's zones)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import Namespace, kill_netns_processes

_ZONE_INIT = Path(__file__).with_name("zone_init.py")


def render(*, bind: str, path: str, clients: list[str], recovery: Path) -> str:
    """A minimal ganesha config: one VFS export of ``path``, v3 and v4, an allow-list."""
    return f"""
NFS_CORE_PARAM {{
    Bind_addr = {bind};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Protocols = 3, 4;
}}
NFSV4 {{
    Graceless = true;
    RecoveryRoot = {recovery};
}}
EXPORT {{
    Export_Id = 1;
    Path = {path};
    Pseudo = {path};
    Protocols = 3, 4;
    SecType = sys;
    Squash = root_squash;
    Access_Type = None;
    CLIENT {{ Clients = {", ".join(clients)}; Access_Type = RW; }}
    FSAL {{ Name = VFS; }}
}}
"""


@dataclass
class Ganesha:
    """ganesha.nfsd serving one path from inside ``ns``."""

    ns: Namespace
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """ganesha's log file."""
        return self.workdir / "ganesha.log"

    def start(self, *, path: str, clients: list[str], timeout: float = 30) -> None:
        """Write the config, start rpcbind and ganesha in the namespace, wait for start-up."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "ganesha.conf"
        conf.write_text(
            render(bind=self.ns.ip, path=path, clients=clients, recovery=self.workdir / "recov")
        )
        argv = self.ns.exec_argv(
            "unshare", "-m", "--propagation", "slave", "--",
            sys.executable, str(_ZONE_INIT),
            str(conf), str(self.log), str(self.workdir / "ganesha.pid"),
        )  # fmt: skip
        with (self.workdir / "stderr.log").open("ab") as stderr:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while "NFS SERVER INITIALIZED" not in self._log_text():
            if self.proc.poll() is not None:
                msg = f"ganesha exited {self.proc.returncode}: {self._log_text()[-2000:]}"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                msg = f"ganesha not up after {timeout}s"
                raise RuntimeError(msg)
            time.sleep(0.1)

    def _log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Kill ganesha and rpcbind (everything in the namespace)."""
        kill_netns_processes(self.ns.name)
        if self.proc is not None:
            self.proc.wait(timeout=10)
            self.proc = None
