"""The events the guest pushes, typed. STDLIB ONLY.

An event is routed by what it carries: ``id`` (the ``exec`` request whose output it is; the
request's response ends that stream) or ``process`` (a container process key; its ``exit``
event ends that stream).
"""

from __future__ import annotations

from uvmshim.protocol.messages import Event, EventKind, ProtocolError
from uvmshim.protocol.schema import Struct

TYPE_CHECKING = False  # not from typing: importing typing costs guest boot time
if TYPE_CHECKING:
    from typing import Any, ClassVar


class EventBody(Struct):
    """The fields of one event; ``EVENT`` names it."""

    EVENT: ClassVar[EventKind]

    @classmethod
    def wire_name(cls) -> str:
        return f"{cls.EVENT} event"

    def to_event(self) -> Event:
        """The envelope that carries this event."""
        return Event(self.EVENT, self.to_json())

    @property
    def route(self) -> int | str | None:
        """Where the event goes: a request id or a process key (None: nowhere)."""
        return None


class OutputEvent(EventBody):
    """A chunk of a process's ``stdout`` or ``stderr``, for request ``id`` (an ``exec``) or
    container process ``process``; exactly one of the two is set."""

    EVENT = EventKind.OUTPUT
    stream: str
    data: bytes
    id: int | None = None
    process: str | None = None

    @property
    def route(self) -> int | str | None:
        return self.process if self.process is not None else self.id

    def to_json(self) -> dict[str, Any]:
        # Only the key that routes it goes on the wire.
        return {k: v for k, v in super().to_json().items() if v is not None}


class ExitEvent(EventBody):
    """Container process ``process`` ended with ``exit_code`` (after all of its output).

    ``error`` is crun's own error when crun failed to run the process (not the process's
    exit): e.g. ``executable file `x` not found in $PATH``; empty otherwise.
    """

    EVENT = EventKind.EXIT
    process: str
    exit_code: int
    error: str = ""

    @property
    def route(self) -> int | str | None:
        return self.process


#: The structure of every event.
EVENT_TYPES: dict[str, type[EventBody]] = {cls.EVENT: cls for cls in (OutputEvent, ExitEvent)}


def decode_event(event: Event) -> EventBody:
    """Return the typed form of ``event``.

    :raises ProtocolError: for an unknown event or a field that does not check.
    """
    cls = EVENT_TYPES.get(event.event)
    if cls is None:
        raise ProtocolError(f"unknown event {event.event!r}")
    return cls.from_json(event.fields)
