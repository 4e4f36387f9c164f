"""uvmshim: OCI Linux containers in a QEMU utility VM, allocated the way hcsshim's LCOW does it.

This module deliberately imports nothing, so that the guest agent (which ships inside the
UVM and must stay stdlib-only) can import ``uvmshim.protocol`` without pulling in the host side.
"""

__version__ = "0.1.0"
