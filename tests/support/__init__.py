"""Real-component test bed: zfs-fuse pools, mosquitto, bridges and namespaces, NFS clients."""
