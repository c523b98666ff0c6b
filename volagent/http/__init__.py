"""The local HTTP API: health, readiness, status, metrics, volumes and tasks of this node.

:class:`LocalApi` serves it; the daemon answers through a :class:`NodeView`.
"""

from volagent.http.app import LocalApi
from volagent.http.view import Check, NodeView

__all__ = ["Check", "LocalApi", "NodeView"]
