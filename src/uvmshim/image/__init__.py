"""OCI images as LCOW layer disks: import, list and remove images; make scratch disks.

::

    record = await import_image("busybox.tar")            # docker-/oci-archive or OCI layout
    folders = layer_folders(record, "/run/c1/scratch")     # top-most layer first, scratch last
    await create_scratch("/run/c1/scratch")                # .../sandbox.vhdx
    cfg = image_config(record)                             # entrypoint, cmd, env, cwd, user

Modules: :mod:`.layout` reads images, :mod:`.tarstream` reads a layer tar, :mod:`.unpack`
applies its entries safely to an in-memory tree, :mod:`.ext4` writes that tree and the file data
as an ext4 image in one pass, :mod:`.tar2ext4` puts it together into ``layer.vhd`` (with
:mod:`.vhd`'s footer), :mod:`.store` caches layers by diff id and records images, and
:mod:`.scratch` makes ``sandbox.vhdx``.
(The busybox test images are built by ``tests/testimages.py``, outside the package.)
"""

from __future__ import annotations

from uvmshim.image.layout import ImageConfig, ImageError
from uvmshim.image.scratch import DEFAULT_SCRATCH_BYTES, SCRATCH_FILE, create_scratch
from uvmshim.image.store import (
    ImageRecord,
    ImageStore,
    ImportEvent,
    get_image,
    image_config,
    import_image,
    layer_folders,
    list_images,
    remove_image,
)
from uvmshim.image.tar2ext4 import LAYER_FILE

__all__ = [
    "DEFAULT_SCRATCH_BYTES",
    "LAYER_FILE",
    "SCRATCH_FILE",
    "ImageConfig",
    "ImageError",
    "ImageRecord",
    "ImageStore",
    "ImportEvent",
    "create_scratch",
    "get_image",
    "image_config",
    "import_image",
    "layer_folders",
    "list_images",
    "remove_image",
]
