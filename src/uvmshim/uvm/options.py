"""Utility VM options (hcsshim's ``OptionsLCOW``), with their limits and annotations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from uvmshim.errors import UvmError
from uvmshim.protocol.constants import MAX_SCSI_CONTROLLERS

GiB = 1 << 30
LUNS_PER_CONTROLLER = 64
MAX_VPMEM_COUNT = 128
DEFAULT_VPMEM_MAX_SIZE = 4 * GiB

ANNOTATION_VPMEM_COUNT = "io.microsoft.virtualmachine.devices.virtualpmem.maximumcount"
ANNOTATION_VPMEM_SIZE = "io.microsoft.virtualmachine.devices.virtualpmem.maximumsizebytes"
ANNOTATION_FULLY_PHYSICALLY_BACKED = "io.microsoft.virtualmachine.fullyphysicallybacked"
ANNOTATION_DISABLE_WRITABLE_SHARES = "io.microsoft.virtualmachine.fileshares.disablewritable"
ANNOTATION_SCSI_CONTROLLERS = "io.microsoft.virtualmachine.devices.scsi.controllercount"


@dataclass(frozen=True, kw_only=True)
class UvmOptions:
    """What a utility VM offers. vPMEM is off by default, so layers go to SCSI.

    :param scsi_controllers: SCSI controllers (1..4; ``None``: 4 without vPMEM, else 1, as
        hcsshim does on builds that can hot-add layers over SCSI).
    :param vpmem_count: vPMEM devices (0..128); 0 turns vPMEM off.
    :param vpmem_max_size: the largest layer file vPMEM takes (a multiple of 4096).
    """

    scsi_controllers: int | None = None
    vpmem_count: int = 0
    vpmem_max_size: int = DEFAULT_VPMEM_MAX_SIZE
    fully_physically_backed: bool = False
    no_writable_file_shares: bool = False

    def __post_init__(self) -> None:
        if self.scsi_controllers is not None and self.scsi_controllers > MAX_SCSI_CONTROLLERS:
            raise UvmError(f"SCSI controller count can't be more than {MAX_SCSI_CONTROLLERS}")
        if self.scsi_controllers is not None and self.scsi_controllers < 0:
            raise UvmError("SCSI controller count can't be negative")
        if self.vpmem_count > MAX_VPMEM_COUNT:
            raise UvmError("VPMem device count cannot be greater than 128")
        if self.vpmem_count < 0:
            raise UvmError("VPMem device count cannot be negative")
        if self.vpmem_count > 0 and (self.vpmem_max_size <= 0 or self.vpmem_max_size % 4096):
            raise UvmError("VPMemSizeBytes must be a multiple of 4096")

    @property
    def effective_vpmem_count(self) -> int:
        """Fully physically backed UVMs have no vPMEM at all."""
        return 0 if self.fully_physically_backed else self.vpmem_count

    @property
    def scsi_controller_count(self) -> int:
        if self.scsi_controllers is not None:
            return self.scsi_controllers
        return MAX_SCSI_CONTROLLERS if self.effective_vpmem_count == 0 else 1

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> UvmOptions:
        """The options a pod's annotations ask for (hcsshim's ``SpecToUVMCreateOptions``)."""

        def number(key: str, default: int | None) -> int | None:
            if key not in annotations:
                return default
            try:
                return int(annotations[key], 0)
            except ValueError:
                raise UvmError(
                    f"expected an integer, got {annotations[key]!r}",
                    where=f"annotations[{key!r}]",
                ) from None

        def flag(key: str) -> bool:
            return annotations.get(key, "").strip().lower() in ("true", "1")

        return cls(
            scsi_controllers=number(ANNOTATION_SCSI_CONTROLLERS, None),
            vpmem_count=number(ANNOTATION_VPMEM_COUNT, 0) or 0,
            vpmem_max_size=number(ANNOTATION_VPMEM_SIZE, DEFAULT_VPMEM_MAX_SIZE)
            or DEFAULT_VPMEM_MAX_SIZE,
            fully_physically_backed=flag(ANNOTATION_FULLY_PHYSICALLY_BACKED),
            no_writable_file_shares=flag(ANNOTATION_DISABLE_WRITABLE_SHARES),
        )
