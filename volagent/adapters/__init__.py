"""Adapters: the only code that touches processes, ZFS, namespaces, the broker and HTTP peers."""
