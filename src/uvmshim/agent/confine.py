"""Confinement the guest adds to every container's spec, whatever the host sent. STDLIB ONLY.

The UVM's block devices (layer disks, scratch disks, every container's ``--disk``) belong to
the UVM, not to a container: a container reaches a disk's files through the mount it was
given, never the raw device. A spec from an engine (podman, containerd) may grant
``CAP_MKNOD`` and a device cgroup that allows block devices (or none at all), so before crun
sees the spec, :func:`deny_uvm_block_devices` appends rules to ``linux.resources.devices``
that deny every block device except those the container was given in ``linux.devices``.

crun (as runc) evaluates the device rules last-to-first and the first match decides, i.e. the
last matching rule in the list wins; so rules appended at the end override the spec's own. The
rules are enforced by crun's eBPF device program on the guest's cgroup v2; with a deny rule in
the list crun refuses to start the container if the program cannot be loaded (it only
ignores that failure for allow-only lists), so the confinement fails closed.

This departs from hcsshim, whose ``createLCOWSpec`` drops ``resources.devices`` because its
guest (GCS) owns the device hierarchy.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not from typing: importing typing costs guest boot time
if TYPE_CHECKING:
    from typing import Any

#: A spec without device rules gets no device program from crun, i.e. every device is allowed;
#: written out, that is this rule.
ALLOW_ALL = {"allow": True, "access": "rwm"}

#: Appended to every container's device rules.
DENY_BLOCK = {"allow": False, "type": "b", "access": "rwm"}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _matches_block(rule: dict[str, Any], major: int, minor: int) -> bool:
    """Whether ``rule`` covers block device ``major:minor`` (absent or negative: any)."""
    if (rule.get("type") or "a") not in ("a", "b"):
        return False
    for key, number in (("major", major), ("minor", minor)):
        value = _int(rule.get(key))
        if value is not None and value >= 0 and value != number:
            return False
    return True


def given_block_devices(spec: dict[str, Any]) -> list[tuple[int, int]]:
    """``(major, minor)`` of each block device in ``linux.devices``, in order, once each."""
    linux = spec.get("linux")
    out: list[tuple[int, int]] = []
    for dev in (linux.get("devices") if isinstance(linux, dict) else None) or []:
        if not isinstance(dev, dict) or dev.get("type") != "b":
            continue
        major, minor = _int(dev.get("major")), _int(dev.get("minor"))
        if major is not None and minor is not None and (major, minor) not in out:
            out.append((major, minor))
    return out


def deny_uvm_block_devices(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (not changed) with block devices denied but those given in ``linux.devices``.

    After the spec's own rules come a rule denying every block device and then, for each
    block device the container was given, the spec's own rules that cover it, narrowed to
    its ``major:minor`` and in their order: a given device keeps exactly the access the spec
    grants it (all of it when the spec has no device rules), every other block device has
    none. Character devices keep what the spec says.
    """
    linux = spec.get("linux")
    linux = dict(linux) if isinstance(linux, dict) else {}
    resources = linux.get("resources")
    resources = dict(resources) if isinstance(resources, dict) else {}
    rules = list(resources.get("devices") or []) or [dict(ALLOW_ALL)]
    added: list[dict[str, Any]] = [dict(DENY_BLOCK)]
    for major, minor in given_block_devices(spec):
        for rule in rules:
            if isinstance(rule, dict) and _matches_block(rule, major, minor):
                added.append({**rule, "type": "b", "major": major, "minor": minor})
    resources["devices"] = rules + added
    linux["resources"] = resources
    return {**spec, "linux": linux}
