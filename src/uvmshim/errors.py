"""The one exception tree of uvmshim.

::

    UvmshimError                    root; ``message`` plus optional ``where`` and ``hint``
    ├── SpecError                   the OCI spec is malformed (``where`` is a JSON path)
    ├── AllocationError             a container's resources could not be allocated
    ├── ReleaseError                one or more releases failed (``errors`` holds them all)
    ├── UvmError                    the utility VM or one of its device managers refused
    │   ├── NoAvailableLocation     every SCSI slot / vPMEM device is taken
    │   ├── VPMemTooLarge           a layer is larger than the vPMEM maximum size
    │   ├── NotAttached             release of something that is not attached
    │   └── ConflictingAttachment   a disk is already attached with other settings
    ├── LayerIntegrityError         a dm-verity layer's content no longer matches its root hash
    ├── BackendError                a host (QMP, bind mount) or guest (agent) operation failed
    │   ├── GuestError              the guest agent refused or failed a request (``kind``)
    │   └── AgentConnectionError    no answer: the agent connection is not open, lost or slow
    └── ToolError                   an external program failed (argv, returncode, stderr tail)

Library code raises these; only the command line turns them into messages and exit codes.
Cancellation (``asyncio.CancelledError``, ``KeyboardInterrupt``) is never wrapped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from uvmshim.protocol.messages import ErrorKind


class UvmshimError(Exception):
    """Root of every error uvmshim raises on purpose.

    :param message: what went wrong.
    :param where: where it went wrong (``mounts[2].source``, ``windows.layerFolders``), if known.
    :param hint: what the user can do about it, if there is something useful to say.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def wrap(self, context: str) -> None:
        """Prefix the message with ``context: `` (Go's ``errors.Wrap``), keeping the type."""
        self.message = f"{context}: {self.message}"
        self.args = (self.__str__(),)


class SpecError(UvmshimError):
    """The OCI spec (config.json) is malformed: bad JSON, a wrong type, a missing field."""


class AllocationError(UvmshimError):
    """A container's resources could not be allocated (bad mount, bad annotation, ...)."""


class ReleaseError(UvmshimError):
    """One or more resources could not be released; ``errors`` holds every failure."""

    def __init__(self, message: str, errors: Sequence[BaseException]) -> None:
        self.errors = tuple(errors)
        detail = "; ".join(str(e) for e in self.errors)
        super().__init__(f"{message}: {detail}" if detail else message)


class UvmError(UvmshimError):
    """A utility VM (or one of its device managers) refused a request."""


class NoAvailableLocation(UvmError):
    """Every slot is in use (hcsshim's ``ErrNoAvailableLocation``)."""

    def __init__(self, message: str = "no available location", **kw: str) -> None:
        super().__init__(message, **kw)


class VPMemTooLarge(UvmError):
    """The layer is bigger than the vPMEM maximum size (hcsshim's ``ErrMaxVPMemLayerSize``)."""

    def __init__(self, message: str = "", **kw: str) -> None:
        super().__init__(message or "layer size is to large for VPMEM max size", **kw)


class NotAttached(UvmError):
    """Release of a resource the UVM does not hold (hcsshim's ``ErrNotAttached``)."""

    def __init__(self, message: str = "not attached", **kw: str) -> None:
        super().__init__(message, **kw)


class ConflictingAttachment(UvmError):
    """A disk is already attached, but with other read-only/option settings."""


class LayerIntegrityError(UvmshimError):
    """A layer mounted through dm-verity failed verification in the guest: its disk was
    changed on the host after the layer was made (reads of the changed blocks fail with EIO)."""


class BackendError(UvmshimError):
    """A host-side (QMP, bind mount) or guest-side (agent) operation failed."""


class BatchError(BackendError):
    """One item of a batch (several shares added in one host round) failed; nothing of the
    batch stayed. ``index`` is that item's position in the batch."""

    def __init__(self, message: str, index: int) -> None:
        self.index = index
        super().__init__(message)


class GuestError(BackendError):
    """The guest agent answered a request with a failure: ``guest <op>: <guest's reason>``.

    :param op: the operation (``mount_scsi``).
    :param kind: why, as the guest classified it (``ErrorKind.NOT_FOUND``, ...).
    :param reason: the guest's message.
    """

    def __init__(self, op: str, kind: ErrorKind, reason: str) -> None:
        self.op = op
        self.kind = kind
        self.reason = reason
        super().__init__(f"guest {op}: {reason}")


class AgentConnectionError(BackendError):
    """A request got no answer: the agent connection is not open (yet or any more), broke, or
    the answer did not come in time."""


class ToolError(UvmshimError):
    """An external program failed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str = "") -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-5:]
        msg = f"{argv[0]} exited with status {returncode}"
        if tail:
            msg += ": " + " / ".join(tail)
        super().__init__(msg)


def os_error_text(op: str, err: OSError, path: str | None = None) -> str:
    """An ``OSError`` worded as Go words a ``PathError``: ``stat /x: no such file or directory``.

    :param path: the path to name (default: the one the error carries).
    """
    reason = (err.strerror or str(err)).lower()
    name = path if path is not None else err.filename
    return f"{op} {name}: {reason}" if name is not None else f"{op}: {reason}"


@contextmanager
def error_context(context: str, *, where: str | None = None) -> Iterator[None]:
    """Prefix any :class:`UvmshimError` raised inside with ``context: `` (Go's ``errors.Wrap``),
    and give it ``where`` if it has none yet. Other exceptions pass through untouched."""
    try:
        yield
    except UvmshimError as err:
        err.wrap(context)
        if where is not None and err.where is None:
            err.where = where
            err.args = (str(err),)
        raise
