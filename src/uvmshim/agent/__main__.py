"""``python3 -m uvmshim.agent [--port PATH]``: the guest agent's entry point. STDLIB ONLY.

/init starts it right after loading virtio_pci and virtio_console. Without ``--port`` it
scans ``/sys/class/virtio-ports/*/name`` for the port named ``agent`` (there is no udev, so
``/dev/virtio-ports/agent`` does not exist) and opens it once, O_RDWR: a virtio-serial port
allows one open at a time.
"""

from __future__ import annotations

import glob
import os
import sys
import time

from uvmshim.agent.server import make_server
from uvmshim.protocol.constants import AGENT_PORT_NAME

#: How long to wait for the port to show up (virtio_console probes asynchronously).
PORT_TIMEOUT = 30.0


def find_port(name: str = AGENT_PORT_NAME, *, sysfs: str = "/sys",
              dev: str = "/dev") -> str | None:
    """Return ``/dev/vportNpM`` for the virtio-serial port called ``name``, or None."""
    for path in sorted(glob.glob(f"{sysfs}/class/virtio-ports/*/name")):
        try:
            with open(path, encoding="utf-8") as f:
                if f.read().strip() != name:
                    continue
        except OSError:
            continue
        node = f"{dev}/{os.path.basename(os.path.dirname(path))}"
        if os.path.exists(node):
            return node
    return None


def main(argv: list[str] | None = None) -> int:
    """Find the port and serve forever; returns an exit status only on a fatal error."""
    # No argparse: every import is paid for at each boot under TCG.
    args = sys.argv[1:] if argv is None else argv
    port: str | None = None
    if args[:1] == ["--port"] and len(args) == 2:
        port = args[1]
    elif args:
        print("usage: python3 -m uvmshim.agent [--port DEVICE]", file=sys.stderr)
        return 2
    deadline = time.monotonic() + PORT_TIMEOUT
    while port is None:
        port = find_port()
        if port is None:
            if time.monotonic() > deadline:
                print(f"uvmshim-agent: no virtio-serial port named {AGENT_PORT_NAME!r}",
                      file=sys.stderr)
                return 1
            time.sleep(0.01)
    fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
    make_server(fd).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
