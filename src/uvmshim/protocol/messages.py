"""The message envelope of the host ↔ guest-agent channel. STDLIB ONLY (shipped in the initrd).

Three kinds of message travel over the agent channel, each one JSON object per frame
(see :mod:`uvmshim.protocol.framing`):

* a **request**, host → guest: ``{"v": 2, "id": 7, "op": "mount_scsi", "args": {...}}``; the
  arguments of each operation are one typed structure (:mod:`uvmshim.protocol.requests`);
* a **response**, guest → host, exactly one per request: ``{"id": 7, "ok": true, "result": ...}``
  or ``{"id": 7, "ok": false, "error": {"kind": "not_found", "message": "<reason>"}}``, where
  ``kind`` is an :class:`ErrorKind` and ``message`` is worded for a person;
* an **event**, guest → host, pushed at any time: ``{"event": "output", "id": 7, ...}``
  (:mod:`uvmshim.protocol.events`). Events that belong to a request (exec output) carry that
  request's ``id``, and the guest sends them all *before* the request's response; events of a
  container process carry its ``process`` key, and its ``exit`` event comes last.

The first request of every connection is ``hello``; the guest answers with its own version and
refuses requests of another version (kind ``protocol``).

What both sides must agree on besides messages (PCI slots, the 9p tag, guest paths) is in
:mod:`uvmshim.protocol.constants`.
"""

from __future__ import annotations

from enum import StrEnum

# Not ``from typing import TYPE_CHECKING``: that imports typing (tens of ms of guest boot under
# TCG). Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    # typing is only for the type checker: importing it costs ~80 ms of guest boot under TCG.
    from typing import Any, TypeAlias

    JSONObject: TypeAlias = dict[str, Any]

#: Bumped on any incompatible change to a request, response or event. 2: typed failures
#: (``{"kind", "message"}`` instead of a bare string) and strictly checked request arguments.
#: 3: ``mount_scsi``/``mount_vpmem`` take ``verity`` (a dm-verity layer); ``verity_status``.
#: 4: a container process with ``process.terminal`` gets a pty in the guest; ``process_resize``.
#: 5: networking: ``add_netns``, ``remove_netns``, ``add_nic``, ``remove_nic``.
#: Not bumped for ``container_stats`` (a new operation; nothing else changed, and an agent
#: without it refuses it as an unknown operation, kind ``protocol``).
PROTOCOL_VERSION = 5


class Op(StrEnum):
    """Request operations (the ``op`` field)."""

    HELLO = "hello"
    PING = "ping"
    MOUNT_SCSI = "mount_scsi"
    UNMOUNT_SCSI = "unmount_scsi"
    MOUNT_PLAN9 = "mount_plan9"
    UNMOUNT_PLAN9 = "unmount_plan9"
    MOUNT_PLAN9_BATCH = "mount_plan9_batch"
    UNMOUNT_PLAN9_BATCH = "unmount_plan9_batch"
    MOUNT_VPMEM = "mount_vpmem"
    UNMOUNT_VPMEM = "unmount_vpmem"
    VERITY_STATUS = "verity_status"
    ADD_VPCI = "add_vpci"
    COMBINE_LAYERS = "combine_layers"
    REMOVE_COMBINED_LAYERS = "remove_combined_layers"
    SANDBOX_DIR = "sandbox_dir"
    HUGEPAGES_DIR = "hugepages_dir"
    INSTALL_DRIVERS = "install_drivers"
    EXEC = "exec"
    SHUTDOWN = "shutdown"
    FRESH_START = "fresh_start"
    LOAD_MODULES = "load_modules"
    CONTAINER_CREATE = "container_create"
    CONTAINER_START = "container_start"
    CONTAINER_EXEC = "container_exec"
    CONTAINER_SIGNAL = "container_signal"
    CONTAINER_DELETE = "container_delete"
    CONTAINER_UPDATE = "container_update"
    CONTAINER_STATS = "container_stats"
    PROCESS_STDIN = "process_stdin"
    PROCESS_RESIZE = "process_resize"
    ADD_NETNS = "add_netns"
    REMOVE_NETNS = "remove_netns"
    ADD_NIC = "add_nic"
    REMOVE_NIC = "remove_nic"
    PARK_READY_NIC = "park_ready_nic"


class EventKind(StrEnum):
    """Event names (the ``event`` field)."""

    #: A chunk of process output: ``{"stream": "stdout"|"stderr", "data": <base64>}`` plus
    #: ``"id"`` (the ``exec`` request's id) or ``"process"`` (a container process key).
    OUTPUT = "output"
    #: A container process ended: ``{"process": <key>, "exit_code": n}`` (after its output).
    EXIT = "exit"


class ErrorKind(StrEnum):
    """Why the guest refused or failed a request (the ``kind`` of a failed response)."""

    #: The request is not understood: another protocol version, an unknown operation, a
    #: malformed message.
    PROTOCOL = "protocol"
    #: An argument is wrong: a mistyped or missing field, a bad id, a path outside its folder.
    INVALID = "invalid"
    #: What the request names does not exist: a container, a process, a share, a tool.
    NOT_FOUND = "not_found"
    #: The request conflicts with the current state: the container exists, was already started,
    #: is not running.
    CONFLICT = "conflict"
    #: The resource is in use (``Device or resource busy``).
    BUSY = "busy"
    #: This guest cannot do it (assigned PCI devices, a huge page size, a file system).
    UNSUPPORTED = "unsupported"
    #: A device or process did not show up in time, or a tool ran too long.
    TIMEOUT = "timeout"
    #: crun failed.
    CRUN = "crun"
    #: Data failed its integrity check: a dm-verity layer whose blocks no longer match their
    #: hashes (the layer disk was changed on the host after import).
    CORRUPT = "corrupt"
    #: A system call or tool failed (mount, mkdir, insmod).
    FAILED = "failed"
    #: A bug in the agent.
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A frame or message does not follow the protocol (bad JSON, missing field, too large)."""


class Request:
    """A request from the host: the envelope of one typed argument structure.

    (Plain classes rather than dataclasses: see :mod:`uvmshim.protocol.schema`.)
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
    """The guest's answer to request ``id``: ``result`` if ``ok``, else ``kind`` and ``error``."""

    __slots__ = ("error", "id", "kind", "ok", "result")

    def __init__(self, id: int, ok: bool, result: Any = None, error: str = "",
                 kind: ErrorKind = ErrorKind.INTERNAL) -> None:
        self.id = id
        self.ok = ok
        self.result = result
        self.error = error
        self.kind = kind

    @classmethod
    def failure(cls, id: int, kind: ErrorKind, error: str) -> Response:
        """A failed response."""
        return cls(id, False, error=error, kind=kind)

    def to_json(self) -> JSONObject:
        """Return the wire form."""
        if self.ok:
            return {"id": self.id, "ok": True, "result": self.result}
        return {"id": self.id, "ok": False,
                "error": {"kind": str(self.kind), "message": self.error}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Response) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        if self.ok:
            return f"Response({self.id!r}, True, {self.result!r})"
        return f"Response.failure({self.id!r}, {self.kind!r}, {self.error!r})"


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
        return _failure(_int(obj, "id"), obj.get("error"))
    raise ProtocolError("message is neither a request, a response nor an event")


def _failure(rid: int, error: object) -> Response:
    if isinstance(error, str):
        # A version-1 agent fails with a bare string. A version-2 host only ever gets one as
        # the answer to its first request: "protocol version mismatch: ...".
        return Response.failure(rid, ErrorKind.PROTOCOL, error)
    if not isinstance(error, dict):
        raise ProtocolError("a failed response needs an error object")
    kind, message = error.get("kind"), error.get("message")
    if not isinstance(message, str) or not isinstance(kind, str):
        raise ProtocolError("an error needs a kind and a message string")
    try:
        return Response.failure(rid, ErrorKind(kind), message)
    except ValueError:
        raise ProtocolError(f"unknown error kind {kind!r}") from None
