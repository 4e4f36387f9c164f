#!/bin/sh
# Make a tiny root filesystem for containers: busybox-static and its applets.
# Usage: examples/make-rootfs.sh DIR   (prints DIR)
set -eu
dir=${1:?usage: make-rootfs.sh DIR}
mkdir -p "$dir/bin" "$dir/proc" "$dir/sys" "$dir/dev" "$dir/etc" "$dir/tmp" "$dir/data"
cp /bin/busybox "$dir/bin/busybox"
for applet in $("$dir/bin/busybox" --list); do
    [ -e "$dir/bin/$applet" ] || ln -s busybox "$dir/bin/$applet"
done
echo "root:x:0:0:root:/:/bin/sh" > "$dir/etc/passwd"
echo "$dir"
