"""One typed argument structure per agent operation, used by the host and the guest. STDLIB ONLY.

The host builds one (``MountScsi(controller=0, lun=3, guest_path="/run/mounts/m1")``) and sends
``Request(id, body.OP, body.to_json())``; the agent turns the request's ``args`` back into the
same class with :func:`decode_request`, which checks every field. The result each operation
answers with is described on its class.
"""

from __future__ import annotations

from uvmshim.protocol.messages import PROTOCOL_VERSION, Op, ProtocolError
from uvmshim.protocol.schema import Struct

TYPE_CHECKING = False  # not from typing: importing typing costs guest boot time
if TYPE_CHECKING:
    from typing import ClassVar

    from uvmshim.protocol.schema import Index, JSONObject, StrList, StrMap


class RequestBody(Struct):
    """The arguments of one operation; ``OP`` names it."""

    OP: ClassVar[Op]

    @classmethod
    def wire_name(cls) -> str:
        return str(cls.OP)


# Section: the connection --------------------------------------------------------------------------


class Hello(RequestBody):
    """The first request of a connection. Result: ``{"version": PROTOCOL_VERSION, "agent": ...,
    "pid": n, "uptime": s, "agent_started": s, "init_started": s}`` (times: guest uptime)."""

    OP = Op.HELLO
    version: int = PROTOCOL_VERSION


class Ping(RequestBody):
    """Is the agent there? Result: ``{"uptime": s}``."""

    OP = Op.PING


class Shutdown(RequestBody):
    """Sync and power off once the (empty) result has been sent."""

    OP = Op.SHUTDOWN


class FreshStart(RequestBody):
    """Make this VM its own, before any container starts: sent once per VM right after ``hello``,
    to a cold-booted VM and, above all, to a clone of a template (whose guest would otherwise
    share the template's random-number state, wall clock and name with every other clone).

    The guest credits ``entropy`` to its random pool (``RNDADDENTROPY``) and forces its CRNG to
    reseed (``RNDRESEEDCRNG``), sets ``CLOCK_REALTIME`` to ``time_ns`` (the host's wall clock
    when it sent the request) and its host name to ``hostname``. Result: ``{"reseeded": bool,
    "uptime": s}``.
    """

    OP = Op.FRESH_START
    entropy: bytes
    time_ns: int
    hostname: str


class LoadModules(RequestBody):
    """Load the kernel modules of these groups (``agent.kmods.MODULE_GROUPS`` names: ``9p``,
    ``scsi``, ``ext4``, ``overlay``, ...) now rather than on first use: a template preloads what
    containers need, so that no clone pays for it."""

    OP = Op.LOAD_MODULES
    groups: StrList


# Section: storage -------------------------------------------------------------------------------


class MountScsi(RequestBody):
    """Wait for the disk at (controller, LUN) and mount it on ``guest_path`` (if not empty).

    With ``verity`` (a :class:`~uvmshim.protocol.verity.Verity` in JSON form; read-only mounts
    only) the file system is mounted through a dm-verity device over the disk.

    Result: ``{"device": "/dev/sdX"}``, plus ``"fstype"`` if it was mounted and ``"verity"``
    (the dm device) if it was mounted through dm-verity.
    """

    OP = Op.MOUNT_SCSI
    controller: Index
    lun: Index
    guest_path: str = ""
    read_only: bool = False
    options: StrList = ()
    verity: JSONObject | None = None


class UnmountScsi(RequestBody):
    """Unmount ``guest_path`` (if not empty) and let go of the disk at (controller, LUN)."""

    OP = Op.UNMOUNT_SCSI
    controller: Index
    lun: Index
    guest_path: str = ""


class MountPlan9(RequestBody):
    """Bind share ``name`` of the 9p export onto ``guest_path``."""

    OP = Op.MOUNT_PLAN9
    name: str
    guest_path: str
    read_only: bool = False


class UnmountPlan9(RequestBody):
    """Unmount share ``name`` from ``guest_path`` and remove the mount point."""

    OP = Op.UNMOUNT_PLAN9
    name: str
    guest_path: str = ""


class MountPlan9Batch(RequestBody):
    """Make share ``names[i]`` of the 9p export appear at ``guest_paths[i]``, for every ``i``,
    all or none (one request for the binds of a whole container).

    The export is mounted once; each guest path becomes a symbolic link to its share's
    directory there (Kata's model: one export with the binds inside it), so that N shares cost
    no guest mount at all. The host already made each share as read-only as asked.
    """

    OP = Op.MOUNT_PLAN9_BATCH
    names: StrList
    guest_paths: StrList


class UnmountPlan9Batch(RequestBody):
    """Take share ``names[i]`` away from ``guest_paths[i]``, in the order given, attempting
    every one (a link of :class:`MountPlan9Batch` is removed, a mount unmounted and its mount
    point removed). Result: ``{"failed": {name: reason}}`` for the shares that stay."""

    OP = Op.UNMOUNT_PLAN9_BATCH
    names: StrList
    guest_paths: StrList


class MountVpmem(RequestBody):
    """Mount vPMEM device ``device`` read-only on ``guest_path`` (through dm-verity if
    ``verity`` is given, as for :class:`MountScsi`)."""

    OP = Op.MOUNT_VPMEM
    device: Index
    guest_path: str
    verity: JSONObject | None = None


class UnmountVpmem(RequestBody):
    """Unmount vPMEM device ``device`` from ``guest_path``."""

    OP = Op.UNMOUNT_VPMEM
    device: Index
    guest_path: str = ""


class VerityStatus(RequestBody):
    """Has dm-verity found a block that does not match its hash under any of these mounts?

    Result: ``{guest_path: {"corrupted": bool, "detail": "..."}}`` for each of
    ``guest_paths`` that is mounted through dm-verity; ``detail`` quotes the kernel's message
    (which block of which device) when there is one.
    """

    OP = Op.VERITY_STATUS
    guest_paths: StrList


class AddVpci(RequestBody):
    """Wait for assigned PCI device ``vmbus_guid`` (this guest refuses: kind ``unsupported``)."""

    OP = Op.ADD_VPCI
    vmbus_guid: str


class CombineLayers(RequestBody):
    """Overlay ``layers`` (top-most first) on ``rootfs``; upper/work below ``scratch_dir``
    (none: read-only)."""

    OP = Op.COMBINE_LAYERS
    container_id: str
    rootfs: str
    layers: StrList
    scratch_dir: str = ""


class RemoveCombinedLayers(RequestBody):
    """Unmount the overlay on ``rootfs``."""

    OP = Op.REMOVE_COMBINED_LAYERS
    rootfs: str


class SandboxDir(RequestBody):
    """Create the directory of ``sandbox://<path>``. Result: its guest path (a string)."""

    OP = Op.SANDBOX_DIR
    sandbox_id: str
    path: str


class HugepagesDir(RequestBody):
    """Create the hugetlbfs-backed directory of ``hugepages://<path>``. Result: its guest path."""

    OP = Op.HUGEPAGES_DIR
    sandbox_id: str
    path: str


class InstallDrivers(RequestBody):
    """Run ``/bin/install-drivers <rw_path> <disk_path>`` in the UVM."""

    OP = Op.INSTALL_DRIVERS
    rw_path: str
    disk_path: str


# Section: processes -----------------------------------------------------------------------------


class Exec(RequestBody):
    """Run ``argv`` in the UVM (not in a container); output comes as ``output`` events carrying
    this request's id. Result: :class:`ExecStatus` (its JSON form).

    ``env`` is added to the guest's default environment (PATH); ``timeout`` (s): the guest
    kills the command after it.
    """

    OP = Op.EXEC
    argv: StrList
    env: StrMap | None = None
    cwd: str = "/"
    stdin: bytes = b""
    timeout: float | None = None


class ExecStatus(Struct):
    """The result of :class:`Exec`: the exit status (negative: killed by that signal)."""

    exit_code: int
    timed_out: bool = False


class ContainerCreate(RequestBody):
    """Write ``<bundle>/config.json`` from ``spec`` (the guest-path OCI spec) and ``crun
    create`` the container: its init exists and waits for :class:`ContainerStart`; crun's error
    fails the request. ``sandbox://`` and ``hugepages://`` mount sources are resolved for
    ``sandbox_id`` (default: the container's own id). ``stdin``: give the init a stdin.

    With ``process.terminal`` in ``spec`` the init gets a pty allocated in the guest (crun's
    console socket, handled by the agent); its output comes as ``stdout`` and its stdin is the
    pty whatever ``stdin`` says. ``process.consoleSize`` (``{"height", "width"}``) is its size
    before the process starts."""

    OP = Op.CONTAINER_CREATE
    container_id: str
    bundle: str
    spec: JSONObject
    sandbox_id: str = ""
    scratch_dir: str = ""
    stdin: bool = False


class ContainerStart(RequestBody):
    """``crun start`` the created container's init (process key: the container id); returns
    once it runs the container's process."""

    OP = Op.CONTAINER_START
    container_id: str


class ContainerExec(RequestBody):
    """Run ``process`` (an OCI process object) in the running container; its process key is
    ``<container_id>/<exec_id>``. ``process.terminal`` and ``process.consoleSize``: as for
    :class:`ContainerCreate`."""

    OP = Op.CONTAINER_EXEC
    container_id: str
    exec_id: str
    process: JSONObject
    stdin: bool = False


class ContainerSignal(RequestBody):
    """Send ``signal`` to the container's init (or to all its processes)."""

    OP = Op.CONTAINER_SIGNAL
    container_id: str
    signal: Index
    all_processes: bool = False


class ContainerDelete(RequestBody):
    """Kill (if needed) and delete the container; forget it."""

    OP = Op.CONTAINER_DELETE
    container_id: str


class ContainerUpdate(RequestBody):
    """``crun update`` of the running container's cgroup with ``resources`` (an OCI
    ``linux.resources`` object: memory, cpu, pids, blockIO...)."""

    OP = Op.CONTAINER_UPDATE
    container_id: str
    resources: JSONObject


class ContainerStats(RequestBody):
    """Read the container's cgroup v2 files in the guest (for ``events --stats``). Result:
    ``{"cgroup": its path in the guest, "files": {name: text}}`` with those of
    ``cpu.stat``, ``cpu.max``, ``memory.current``, ``memory.max``, ``memory.peak``,
    ``memory.stat``, ``memory.events``, ``memory.swap.current``, ``memory.swap.max``,
    ``pids.current``, ``pids.max`` that exist; fails with kind ``conflict`` once the
    container's init is gone."""

    OP = Op.CONTAINER_STATS
    container_id: str


class ProcessStdin(RequestBody):
    """Write ``data`` to the stdin of the process with key ``process``; then close it if
    ``eof`` (a process on a pty instead reads end-of-file: the terminal's EOF character is
    written, if the terminal is in canonical mode)."""

    OP = Op.PROCESS_STDIN
    process: str
    data: bytes = b""
    eof: bool = False


class ProcessResize(RequestBody):
    """Set the window size of the pty of the process with key ``process`` (one started with
    ``process.terminal``); its foreground process group gets ``SIGWINCH``."""

    OP = Op.PROCESS_RESIZE
    process: str
    rows: Index
    cols: Index


# Section: networking ----------------------------------------------------------------------------


class AddNetNS(RequestBody):
    """Create the guest network namespace ``ns_id`` (a bind mount at
    :func:`~uvmshim.protocol.constants.guest_netns_path`) with ``lo`` up. Containers join it
    through their spec's ``linux.namespaces`` entry. Result: its path (a string).

    With ``bind_ready``, the ready NIC's driver is bound meanwhile (the namespace's first
    ``AddNic`` will be ``ready``)."""

    OP = Op.ADD_NETNS
    ns_id: str
    bind_ready: bool = False


class RemoveNetNS(RequestBody):
    """Remove the guest network namespace ``ns_id`` (its NICs go back to the UVM's own
    namespace, where their hot-unplug removes them)."""

    OP = Op.REMOVE_NETNS
    ns_id: str


class AddNic(RequestBody):
    """Wait for the NIC whose MAC is ``mac`` (a hot-added ``virtio-net-pci``), move it into
    the namespace ``ns_id`` under the name ``ifname``, set ``mtu`` (0: keep), add
    ``addresses`` (``ADDR/PREFIX``, IPv4 or IPv6) and ``routes`` (``DEST/PREFIX [via GW]
    [metric N]``, see :func:`parse_route`) and bring it up. Result: ``{"ifname": name}``.

    With ``ready``, the NIC is the ready NIC instead
    (:data:`~uvmshim.protocol.constants.READY_NIC_PCI_SLOT`, present from boot with its driver
    unbound): its driver is bound now, and it gets ``mac`` as it moves."""

    OP = Op.ADD_NIC
    ns_id: str
    nic_id: str
    mac: str
    ifname: str
    mtu: Index = 0
    addresses: StrList = ()
    routes: StrList = ()
    ready: bool = False


class RemoveNic(RequestBody):
    """Forget NIC ``nic_id`` before its hot-unplug (which takes the device away with its
    addresses and routes); the ready NIC, which is not unplugged, has its driver unbound (the
    interface goes, with its addresses and routes)."""

    OP = Op.REMOVE_NIC
    ns_id: str
    nic_id: str


class ParkReadyNic(RequestBody):
    """Bind the ready NIC's driver now and park its interface, down, in the network namespace
    :data:`~uvmshim.protocol.constants.READY_NETNS_ID` (made by ``load_modules`` of ``net``)
    as :data:`~uvmshim.protocol.constants.READY_NIC_IFNAME`: for a template whose ready NIC
    has a tap (its features are negotiated with one), so that a clone's first interface only
    renames it and sets its MAC."""

    OP = Op.PARK_READY_NIC


def parse_route(text: str) -> tuple[str, str, int]:
    """``"DEST/PREFIX [via GW] [metric N]"`` → ``(dest, gateway or "", metric)``.

    Only the syntax is checked here (the agent stays cheap to import); the addresses are
    checked by whoever uses them.

    :raises ProtocolError: anything else.
    """
    words = text.split()
    if not words or "/" not in words[0]:
        raise ProtocolError(f"bad route {text!r}: expected DEST/PREFIX [via GW] [metric N]")
    dest, gateway, metric = words[0], "", 0
    rest = words[1:]
    while rest:
        if len(rest) < 2:
            raise ProtocolError(f"bad route {text!r}: {rest[0]!r} needs a value")
        key, value, rest = rest[0], rest[1], rest[2:]
        if key == "via" and not gateway:
            gateway = value
        elif key == "metric" and value.isdigit() and int(value) < 2**32:
            metric = int(value)
        else:
            raise ProtocolError(f"bad route {text!r}: unexpected {key!r} {value!r}")
    return dest, gateway, metric


def format_route(dest: str, gateway: str = "", metric: int = 0) -> str:
    """The wire form of a route (the inverse of :func:`parse_route`)."""
    return " ".join([dest, *(["via", gateway] if gateway else []),
                     *(["metric", str(metric)] if metric else [])])


def process_key(container_id: str, exec_id: str = "") -> str:
    """The key of a container process: the container id (its init) or ``<id>/<exec id>``."""
    return f"{container_id}/{exec_id}" if exec_id else container_id


#: The argument structure of every operation.
REQUEST_TYPES: dict[str, type[RequestBody]] = {
    cls.OP: cls for cls in (
        Hello, Ping, Shutdown, FreshStart, LoadModules, MountScsi, UnmountScsi, MountPlan9,
        UnmountPlan9, MountPlan9Batch, UnmountPlan9Batch, MountVpmem,
        UnmountVpmem, VerityStatus, AddVpci, CombineLayers, RemoveCombinedLayers, SandboxDir,
        HugepagesDir,
        InstallDrivers, Exec, ContainerCreate, ContainerStart, ContainerExec, ContainerSignal,
        ContainerDelete, ContainerUpdate, ContainerStats, ProcessStdin, ProcessResize, AddNetNS,
        RemoveNetNS, AddNic, RemoveNic, ParkReadyNic,
    )
}


def decode_request(op: str, args: object) -> RequestBody:
    """Return the typed arguments of operation ``op``.

    :raises ProtocolError: for an unknown operation or an argument that does not check.
    """
    cls = REQUEST_TYPES.get(op)
    if cls is None:
        raise ProtocolError(f"unknown operation {op!r}")
    return cls.from_json(args)
