"""``uvmshim plan``: run an allocation on a fresh simulated UVM and report what it did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from uvmshim.allocator import Allocation, create_container_resources
from uvmshim.layers import LayersHandle
from uvmshim.resources import Resource
from uvmshim.spec import Spec
from uvmshim.uvm.options import UvmOptions
from uvmshim.uvm.sim import Operation, simulated_uvm


@dataclass
class PlanResult:
    """What a plan shows: the allocation, the operations it took, and what release left."""

    input_spec: Spec
    allocation: Allocation
    resources: list[dict[str, Any]]
    operations: list[Operation]
    release_operations: list[Operation] = field(default_factory=list)
    leftovers: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"PlanResult({self.allocation!r}, operations={len(self.operations)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "container_id": self.allocation.container_id,
            "spec": self.allocation.spec.to_json(),
            "guest_document": self.allocation.guest_document,
            # hcsshim drops hooks and most resources from the guest's document; uvmshim's
            # guest applies them (docs/oci-runtime.md): both, to compare
            "hcsshim_document": self.allocation.hcsshim_document,
            "resources": self.resources,
            "operations": [op.to_json() for op in self.operations],
            "release_operations": [op.to_json() for op in self.release_operations],
            "leftovers": self.leftovers,
        }


def describe_resources(resources: list[Resource], *, owner: str) -> list[dict[str, Any]]:
    """Flatten handles for display: a layers handle is shown with its layer and scratch disks."""
    out: list[dict[str, Any]] = []
    for r in resources:
        if isinstance(r, LayersHandle):
            parts = r.parts()
            for i, part in enumerate(parts):
                role = "scratch" if i == len(parts) - 1 else "layer"
                out.append({**part.describe(), "role": role, "owner": owner})
        out.append({**r.describe(), "owner": owner})
    return out


async def plan(spec: Spec, *, container_id: str = "", use_uvm: bool = True,
               options: UvmOptions | None = None) -> PlanResult:
    """Allocate ``spec`` on a fresh simulated UVM (or none), then release it all again.

    :raises UvmshimError: the allocation failed (nothing is left allocated).
    """
    if not use_uvm:
        allocation = await create_container_resources(spec, None, container_id)
        return PlanResult(spec, allocation, [], [])
    opts = options or UvmOptions.from_annotations(spec.annotations)
    vm, backend = simulated_uvm(opts)
    allocation = await create_container_resources(spec, vm, container_id)
    resources = describe_resources(list(allocation.resources), owner="container")
    resources += describe_resources(vm.owned, owner="uvm")
    operations = list(backend.operations)
    await allocation.resources.release()
    await vm.release_owned()
    release_ops = backend.operations[len(operations):]
    return PlanResult(spec, allocation, resources, operations, release_ops, backend.live())
