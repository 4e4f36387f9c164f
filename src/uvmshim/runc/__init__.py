"""uvmshim as an OCI runtime: the runc command line and the per-container shim.

podman, containerd and CRI-O drive a runtime binary with runc's command line. ``create`` forks
a *shim* (:mod:`uvmshim.runc.shim`) that boots the utility VM, creates the container in
it, relays its stdio and exits with its exit status; later commands talk to the shim over a
unix socket in the container's state directory (:mod:`uvmshim.runc.state`).

This package imports nothing heavy at import time: ``state``, ``list`` and ``kill`` must start
fast (podman calls the runtime several times per container).
"""
