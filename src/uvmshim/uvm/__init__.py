"""The utility VM: device managers (SCSI, Plan9, vPMEM, vPCI) over swappable backends."""
