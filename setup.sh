#!/bin/sh
# Set up uvmshim on a Debian 12 machine (as root) and run a first container in a UVM.
#   1. Debian packages: QEMU, qemu-img, e2fsprogs, busybox-static, crun (for the guest);
#      cryptsetup-bin (veritysetup checks our dm-verity layers), skopeo (image pull),
#      docker-registry (a loopback registry for the pull tests), debootstrap (the Debian
#      image test); podman, containerd and runc (the OCI clients the runtime tests drive);
#      runsc (gVisor: the benchmarks' other sandboxed runtime).
#   2. uvmshim itself (pip, editable) with its test tools.
#   3. The UVM boot files (a Debian kernel and an initrd with the guest agent), cached.
#   4. A demo: a busybox container with a bind mount, a read-only file, a disk and a
#      hugepages mount, which prints its mounts.
set -eu
cd "$(dirname "$0")"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    qemu-system-x86 qemu-utils busybox-static crun e2fsprogs zstd \
    cryptsetup-bin skopeo docker-registry debootstrap linux-libc-dev \
    podman conmon containerd runc runsc uidmap fuse-overlayfs catatonit \
    ca-certificates >/dev/null
python3 -m pip install -q -e '.[test]'

uvmshim uvm build

[ "${1:-}" = "--no-demo" ] && exit 0
demo=$(mktemp -d /tmp/uvmshim-demo.XXXXXX)
trap 'rm -rf "$demo"' EXIT
examples/make-rootfs.sh "$demo/rootfs" >/dev/null
mkdir -p "$demo/data" "$demo/disk"
echo "hello from the host" > "$demo/data/hello.txt"
echo "a file on a disk" > "$demo/disk/on-disk.txt"
mkfs.ext4 -q -F -d "$demo/disk" "$demo/disk.img" 16M >/dev/null
uvmshim run --rootfs "$demo/rootfs" \
    -v "$demo/data:/data" -v "$PWD/examples/files/config/app.json:/etc/app.json:ro" \
    --disk "$demo/disk.img:/disk:ro" --hugepages demo:/hugepages -- \
    sh -c 'cat /data/hello.txt /disk/on-disk.txt /etc/app.json; grep -E " /(data|disk|etc/app.json|hugepages) " /proc/mounts'
