"""Where the demo keeps its things and what it names them: one work directory, one tag.

Everything the demo makes lives under one work directory and carries one tag (:class:`Layout`):
the pool ``<tag>``, the bridge ``<tag>0``, the client namespaces ``<tag>-c1``.. with their host
veths ``<tag>-c1h``.., and, made by the agent with ``zones.name_prefix = <tag>``, the zones'
namespaces ``<tag>-<uuid>``, their host veths ``<tag><digest>`` (ports of the bridge) and
their cgroups below ``/<tag>`` in each hierarchy. A marker file in the work directory records
the tag, so that a later run or ``scripts/demo stop`` finds what an earlier run made.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from volagent.errors import VolagentError

__all__ = [
    "CLIENTS",
    "CLIENT_UID",
    "MARKER",
    "NETWORK",
    "SUBNET",
    "Layout",
    "claim_dir",
    "mark_dir",
]

#: The tenants' network: no host address, no uplink, reachable only over the demo's bridge.
SUBNET: Final = ipaddress.IPv4Network("10.77.0.0/24")
#: The agent's name for that network (``networks.<name>.bridge`` in its configuration).
NETWORK: Final = "tenants"
#: Client namespaces and their host number in :data:`SUBNET`.
CLIENTS: Final = {"c1": 101, "c2": 102, "c3": 103}
#: The uid and gid the NFS clients act as (root would be squashed).
CLIENT_UID: Final = 1000
#: The file in the work directory that marks it as the demo's; it holds the tag.
MARKER: Final = ".volagent-demo"

_TAG_RE: Final = re.compile(r"[a-z][a-z0-9]{0,5}")


@dataclass(frozen=True)
class Layout:
    """Where the demo keeps everything and what it names things, from a directory and a tag."""

    checkout: Path
    dir: Path
    tag: str

    def __post_init__(self) -> None:
        """Refuse a tag the agent's ``zones.name_prefix`` would refuse (or that is too long)."""
        if _TAG_RE.fullmatch(self.tag) is None:
            raise VolagentError(
                f"DEMO_TAG {self.tag!r}: a lower-case letter then at most 5 letters or digits"
            )

    @property
    def volagent(self) -> Path:
        """The command line of the project's virtual environment."""
        return self.checkout / ".venv" / "bin" / "volagent"

    @property
    def pool(self) -> str:
        """The demo's pool."""
        return self.tag

    @property
    def image(self) -> Path:
        """The sparse file holding the pool."""
        return self.dir / f"{self.tag}.img"

    @property
    def mount_root(self) -> Path:
        """A shared bind mount of itself, under which the pool is mounted (born shared)."""
        return self.dir / "mnt"

    @property
    def mountpoint(self) -> Path:
        """Where the pool is mounted."""
        return self.mount_root / self.pool

    @property
    def dataset_root(self) -> str:
        """The dataset under which the agent creates the volumes."""
        return f"{self.pool}/volumes"

    @property
    def bridge(self) -> str:
        """The bridge of the tenants' network."""
        return f"{self.tag}0"

    @property
    def config(self) -> Path:
        """The agent's configuration file."""
        return self.dir / "volagent.toml"

    @property
    def state(self) -> Path:
        """The agent's state directory."""
        return self.dir / "state"

    @property
    def broker_dir(self) -> Path:
        """The broker's configuration, persistence and log."""
        return self.dir / "broker"

    @property
    def broker_conf(self) -> Path:
        """The broker's configuration file."""
        return self.broker_dir / "mosquitto.conf"

    @property
    def broker_pid(self) -> Path:
        """The broker's pid file."""
        return self.broker_dir / "mosquitto.pid"

    @property
    def agent_log(self) -> Path:
        """The agent's log (its standard output and error)."""
        return self.dir / "agent.log"

    @property
    def agent_pid(self) -> Path:
        """The agent's pid file."""
        return self.dir / "agent.pid"

    @property
    def zfs_pid(self) -> Path:
        """The pid file of a zfs-fuse daemon this demo started (absent otherwise)."""
        return self.dir / "zfs-fuse.pid"

    @property
    def files(self) -> Path:
        """Files the clients copy to the volumes."""
        return self.dir / "files"

    @property
    def cgroup_parent(self) -> str:
        """``zones.cgroup_parent``: the zones' cgroups, at the root of each hierarchy."""
        return f"/{self.tag}"

    def client_ns(self, client: str) -> str:
        """The network namespace of a client."""
        return f"{self.tag}-{client}"

    def client_if(self, client: str) -> str:
        """The host end of a client's veth."""
        return f"{self.tag}-{client}h"

    @staticmethod
    def ip(host: int) -> str:
        """Host number ``host`` of the tenants' network."""
        return str(SUBNET.network_address + host)

    def owns_netns(self, name: str) -> bool:
        """Whether a network namespace is the demo's (a client's or a zone's)."""
        return name.startswith(f"{self.tag}-")

    def owns_link(self, name: str, master: str | None) -> bool:
        """Whether a link is the demo's: the bridge, a port of it, or a client's veth.

        A zone's veth is a port of the bridge; its peer lives in the zone's namespace, so
        deleting the namespace deletes the pair (as it does a client's).
        """
        client_if = re.fullmatch(rf"{self.tag}-c\d+h", name) is not None
        return self.bridge in (name, master) or client_if


def claim_dir(directory: Path) -> str | None:
    """Make sure ``directory`` can be the demo's work directory; the tag an earlier run left.

    A directory that exists, is not empty and was not made by the demo is refused: the demo
    removes what it finds in its work directory.
    """
    marker = directory / MARKER
    previous = marker.read_text().strip() if marker.is_file() else None
    if previous is None and directory.is_dir() and any(directory.iterdir()):
        raise VolagentError(
            f"{directory} is not empty and is not a demo work directory (no {MARKER} file):"
            " refusing to use it; set DEMO_DIR to another directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    return previous or None


def mark_dir(directory: Path, tag: str) -> None:
    """Record that ``directory`` holds what a demo tagged ``tag`` made."""
    (directory / MARKER).write_text(tag + "\n")
