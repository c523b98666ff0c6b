"""volagent: the compute-node agent that serves shared NFS volumes.

Each volume is a ZFS dataset served by its own isolated nfs-ganesha zone; tasks arrive over
MQTT and state is reported to the central volume API. See ``docs/architecture.md``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("volagent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
