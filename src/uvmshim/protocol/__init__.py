"""The host ↔ guest-agent wire protocol. STDLIB ONLY: it is shipped into the utility VM.

:mod:`~uvmshim.protocol.messages` defines requests, responses, events, the protocol version and
the layout conventions both sides must agree on (SCSI controller PCI slots, the 9p share
layout, the agent port name); :mod:`~uvmshim.protocol.framing` turns messages into frames.
"""

from uvmshim.protocol.framing import (
    MAX_FRAME_SIZE,
    FrameDecoder,
    decode_payload,
    encode_frame,
    read_frame,
    write_frame,
)
from uvmshim.protocol.messages import (
    AGENT_PORT_NAME,
    PLAN9_GUEST_ROOT,
    PLAN9_MOUNT_OPTIONS,
    PLAN9_MOUNT_TAG,
    PROTOCOL_VERSION,
    SCSI_CONTROLLER_PCI_SLOTS,
    SCSI_TARGET,
    VPMEM_ROOT_PORT_PCI_SLOT_BASE,
    Event,
    EventKind,
    Message,
    Op,
    ProtocolError,
    Request,
    Response,
    check_share_name,
    parse_message,
    plan9_share_guest_path,
    plan9_share_host_path,
    scsi_controller_pci_address,
    scsi_linux_lun,
    vpmem_root_port_pci_address,
)

__all__ = [
    "AGENT_PORT_NAME",
    "MAX_FRAME_SIZE",
    "PLAN9_GUEST_ROOT",
    "PLAN9_MOUNT_OPTIONS",
    "PLAN9_MOUNT_TAG",
    "PROTOCOL_VERSION",
    "SCSI_CONTROLLER_PCI_SLOTS",
    "SCSI_TARGET",
    "VPMEM_ROOT_PORT_PCI_SLOT_BASE",
    "Event",
    "EventKind",
    "FrameDecoder",
    "Message",
    "Op",
    "ProtocolError",
    "Request",
    "Response",
    "check_share_name",
    "decode_payload",
    "encode_frame",
    "parse_message",
    "plan9_share_guest_path",
    "plan9_share_host_path",
    "read_frame",
    "scsi_controller_pci_address",
    "scsi_linux_lun",
    "vpmem_root_port_pci_address",
    "write_frame",
]
