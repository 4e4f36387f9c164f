"""The uvmshim guest agent: runs inside the utility VM as ``python3 -m uvmshim.agent``.

STDLIB ONLY. It may import only the standard library, itself and :mod:`uvmshim.protocol`
(a test enforces this): the initrd carries a stripped Debian python3 and nothing else.

Modules: :mod:`.server` (request loop over the virtio-serial port, exec), :mod:`.storage`
(SCSI, 9p, vPMEM, overlay, sandbox/hugepage dirs), :mod:`.kmods` (on-demand kernel modules),
:mod:`.runtime` (containers through crun), :mod:`.paths` (``sandbox://``/``hugepages://``
rules) and :mod:`.util` (mount helpers).
"""
