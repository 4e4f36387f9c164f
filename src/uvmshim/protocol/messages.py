"""Wire messages and layout conventions shared by the host and the guest agent.

STDLIB ONLY: this module is copied into the utility VM's initrd and imported by the agent.

Three kinds of message travel over the agent channel, each one JSON object per frame
(see :mod:`uvmshim.protocol.framing`):

* a **request**, host → guest: ``{"v": 1, "id": 7, "op": "mount_scsi", "args": {...}}``;
* a **response**, guest → host, exactly one per request:
  ``{"id": 7, "ok": true, "result": ...}`` or ``{"id": 7, "ok": false, "error": "<reason>"}``;
* an **event**, guest → host, pushed at any time: ``{"event": "output", "id": 7, ...}``.
  Events that belong to a request (exec output) carry that request's ``id``, and the guest
  sends them all *before* the request's response.

The first request of every connection is ``hello`` with ``{"version": PROTOCOL_VERSION}``; the
guest answers with its own version and refuses requests of another version.
"""

from __future__ import annotations

import posixpath
from enum import StrEnum

# Not ``from typing import TYPE_CHECKING``: that imports typing (tens of ms of guest boot under
# TCG). Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    # typing is only for the type checker: importing it costs ~80 ms of guest boot under TCG.
    from typing import Any, TypeAlias

    JSONObject: TypeAlias = dict[str, Any]

#: Bumped on any incompatible change to a request, response or event.
PROTOCOL_VERSION = 1

#: ``name=`` of the ``virtserialport`` the agent listens on (``/sys/class/virtio-ports/*/name``).
AGENT_PORT_NAME = "agent"

#: PCI slots (bus 0, function 0) of the boot-time ``virtio-scsi-pci`` controllers: controller
#: ``i`` is at ``0000:00:<slot>.0``. The host must create them there; the guest finds disks
#: through these addresses because the guest-side SCSI host number is not predictable.
SCSI_CONTROLLER_PCI_SLOTS: tuple[int, ...] = (5, 6, 7, 8)

#: PCI slot of the ``pcie-root-port`` behind which vPMEM device ``n`` sits: ``0000:00:<base+n>.0``
#: (the ``virtio-pmem-pci`` device is the port's only child). /dev/pmemX numbering follows probe
#: order, not the device number, so the guest resolves the device through this address.
VPMEM_ROOT_PORT_PCI_SLOT_BASE = 0x10

#: SCSI target (QMP ``scsi-id``) every disk uses; the LUN is the hcsshim LUN, channel is 0.
SCSI_TARGET = 0

#: ``mount_tag`` of the one virtio-9p export of a utility VM.
PLAN9_MOUNT_TAG = "share0"

#: Where the agent mounts the 9p export (once, lazily).
PLAN9_GUEST_ROOT = "/run/uvmshim/share0"

#: 9p mount options: ``msize=512000`` doubles throughput; ``cache=none`` so that host-side bind
#: mounts made after the guest mounted the export are seen at once.
PLAN9_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=none"


class Op(StrEnum):
    """Request operations (the ``op`` field)."""

    HELLO = "hello"
    PING = "ping"
    MOUNT_SCSI = "mount_scsi"
    UNMOUNT_SCSI = "unmount_scsi"
    MOUNT_PLAN9 = "mount_plan9"
    UNMOUNT_PLAN9 = "unmount_plan9"
    MOUNT_VPMEM = "mount_vpmem"
    UNMOUNT_VPMEM = "unmount_vpmem"
    ADD_VPCI = "add_vpci"
    COMBINE_LAYERS = "combine_layers"
    REMOVE_COMBINED_LAYERS = "remove_combined_layers"
    SANDBOX_DIR = "sandbox_dir"
    HUGEPAGES_DIR = "hugepages_dir"
    INSTALL_DRIVERS = "install_drivers"
    EXEC = "exec"
    SHUTDOWN = "shutdown"
    CONTAINER_CREATE = "container_create"
    CONTAINER_START = "container_start"
    CONTAINER_EXEC = "container_exec"
    CONTAINER_SIGNAL = "container_signal"
    CONTAINER_DELETE = "container_delete"
    PROCESS_STDIN = "process_stdin"


class EventKind(StrEnum):
    """Event names (the ``event`` field)."""

    #: A chunk of process output: ``{"stream": "stdout"|"stderr", "data": <base64>}`` plus
    #: ``"id"`` (the ``exec`` request's id) or ``"process"`` (a container process key).
    OUTPUT = "output"
    #: A container process ended: ``{"process": <key>, "exit_code": n}`` (after its output).
    EXIT = "exit"


class ProtocolError(Exception):
    """A frame or message does not follow the protocol (bad JSON, missing field, too large)."""


def scsi_controller_pci_address(controller: int) -> str:
    """Return the PCI address (``0000:00:05.0``) of SCSI controller ``controller``.

    :raises ValueError: if there is no such controller.
    """
    if not 0 <= controller < len(SCSI_CONTROLLER_PCI_SLOTS):
        raise ValueError(f"SCSI controller {controller} out of range")
    return f"0000:00:{SCSI_CONTROLLER_PCI_SLOTS[controller]:02x}.0"


def vpmem_root_port_pci_address(device: int) -> str:
    """Return the PCI address of the root port that holds vPMEM device ``device``."""
    if not 0 <= device < 0x20 - VPMEM_ROOT_PORT_PCI_SLOT_BASE:
        raise ValueError(f"vPMEM device {device} out of range")
    return f"0000:00:{VPMEM_ROOT_PORT_PCI_SLOT_BASE + device:02x}.0"


def scsi_linux_lun(lun: int) -> int:
    """Return the LUN number Linux shows for QMP ``lun``.

    Linux presents LUNs >= 256 in SAM flat-space addressing, i.e. ``0x4000 | lun``.
    """
    return lun if lun < 256 else 0x4000 | lun


def check_share_name(name: str) -> str:
    """Return ``name`` if it is a valid 9p share name (one plain path component).

    :raises ValueError: for an empty name, ``.``/``..`` or a name containing ``/`` or NUL.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid share name {name!r}")
    return name


def plan9_share_host_path(export_root: str, name: str) -> str:
    """Return where the host puts share ``name``: ``<export_root>/<name>``.

    The host bind-mounts the shared directory there; a single-file share is a directory
    ``<export_root>/<name>`` that holds just that file (bound in). Never bind over the
    export root itself: QEMU would not see it (it holds an fd to the root).
    """
    return posixpath.join(export_root, check_share_name(name))


def plan9_share_guest_path(name: str) -> str:
    """Return where the guest finds share ``name``: ``PLAN9_GUEST_ROOT/<name>``."""
    return posixpath.join(PLAN9_GUEST_ROOT, check_share_name(name))


class Request:
    """A request from the host.

    (Plain classes rather than dataclasses: the agent imports this module at every boot, and
    ``dataclasses`` pulls in ``inspect`` and runs ``exec`` per class, which costs tens of
    milliseconds under TCG.)
    """

    __slots__ = ("args", "id", "op", "version")

    def __init__(self, id: int, op: str, args: JSONObject | None = None,
                 version: int = PROTOCOL_VERSION) -> None:
        self.id = id
        self.op = op
        self.args: JSONObject = {} if args is None else args
        self.version = version

    def to_json(self) -> JSONObject:
        """Return the wire form."""
        return {"v": self.version, "id": self.id, "op": self.op, "args": self.args}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Request({self.id!r}, {self.op!r}, {self.args!r}, version={self.version!r})"


class Response:
    """The guest's answer to request ``id``: ``result`` if ``ok``, else ``error``."""

    __slots__ = ("error", "id", "ok", "result")

    def __init__(self, id: int, ok: bool, result: Any = None,
                 error: str = "") -> None:
        self.id = id
        self.ok = ok
        self.result = result
        self.error = error

    def to_json(self) -> JSONObject:
        """Return the wire form."""
        if self.ok:
            return {"id": self.id, "ok": True, "result": self.result}
        return {"id": self.id, "ok": False, "error": self.error}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Response) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Response({self.id!r}, {self.ok!r}, {self.result!r}, error={self.error!r})"


class Event:
    """A message pushed by the guest; ``fields`` holds everything but ``event``."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: JSONObject | None = None) -> None:
        self.event = event
        self.fields: JSONObject = {} if fields is None else fields

    def to_json(self) -> JSONObject:
        """Return the wire form."""
        return {**self.fields, "event": self.event}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Event({self.event!r}, {self.fields!r})"


Message = Request | Response | Event


def _int(obj: JSONObject, key: str) -> int:
    value = obj.get(key)
    # bool is an int subclass; a JSON true is not an id.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"message field {key!r} must be an integer, got {value!r}")
    return value


def parse_message(obj: object) -> Message:
    """Classify and check one decoded frame.

    :raises ProtocolError: if ``obj`` is not a well-formed request, response or event.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(obj).__name__}")
    if "event" in obj:
        name = obj["event"]
        if not isinstance(name, str):
            raise ProtocolError("event name must be a string")
        return Event(name, {k: v for k, v in obj.items() if k != "event"})
    if "op" in obj:
        op = obj["op"]
        if not isinstance(op, str):
            raise ProtocolError("op must be a string")
        args = obj.get("args", {})
        if not isinstance(args, dict):
            raise ProtocolError("args must be a JSON object")
        return Request(_int(obj, "id"), op, args, _int(obj, "v"))
    if "ok" in obj:
        ok = obj["ok"]
        if not isinstance(ok, bool):
            raise ProtocolError("ok must be a boolean")
        if ok:
            return Response(_int(obj, "id"), True, obj.get("result"))
        error = obj.get("error")
        if not isinstance(error, str):
            raise ProtocolError("a failed response needs an error string")
        return Response(_int(obj, "id"), False, error=error)
    raise ProtocolError("message is neither a request, a response nor an event")
