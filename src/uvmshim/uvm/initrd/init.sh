#!/bin/sh
# /init of the uvmshim utility VM (busybox sh, PID 1). Part of the boot-file cache key.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

# crun's pivot_root(2) fails with EINVAL on the initramfs root (it has no parent mount).
# Re-enter through a bind mount of / moved onto itself: nothing is copied, and afterwards
# / is an ordinary mount that pivot_root accepts. (busybox switch_root would delete the
# initramfs contents, i.e. the very files we run from.)
if [ -z "$UVMSHIM_REBOUND" ]; then
  mkdir -p /.root && mount --bind / /.root && cd /.root && mount --move . / &&
    UVMSHIM_REBOUND=1 exec chroot . /init "$@"
  echo "uvmshim-init: root rebind failed; crun will need --no-pivot" > /dev/console
fi
cd /

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
# crun needs cgroup2 here (even with the cgroupfs manager) and a writable /run for its state.
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
read UVMSHIM_T_INIT _ < /proc/uptime
export UVMSHIM_T_INIT

# The agent: PYTHONHASHSEED=0 so that its start never waits for the crng (hash-flooding is
# not a concern for requests from our own host); -S -s -P keep site and the cwd out of it.
# Restart it if it ever dies, so the host can reconnect. It starts before its modules are
# loaded: Python's start-up then overlaps the insmods (the agent waits for its port).
(
  while :; do
    PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 \
      /usr/bin/python3 -S -s -P -m uvmshim.agent </dev/null >/dev/console 2>&1
    echo "uvmshim-init: agent exited with status $?; restarting" > /dev/console
    sleep 1
  done
) &

# Only what the agent needs to talk to the host; everything else is loaded on demand.
while read -r m; do
  [ -n "$m" ] && insmod "/lib/modules/$m.ko"
done < /etc/uvmshim/modules.early

# Entropy: without RDRAND (plain qemu64 under TCG) the kernel's crng is ready only ~1 s after
# /init starts, and anything calling getrandom() blocks until then. A virtio-rng device, if
# the host provides one, feeds it right away.
if ! grep -q rdrand /proc/cpuinfo; then
  for d in /sys/bus/pci/devices/*; do
    case "$(cat "$d/vendor" "$d/device" 2>/dev/null | tr '\n' ' ')" in
      "0x1af4 0x1005 "|"0x1af4 0x1044 ") insmod /lib/modules/virtio_rng.ko 2>/dev/null ;;
    esac
  done
fi

ip link set lo up 2>/dev/null

# Early set-up is over (protocol.constants.BOOT_DONE_MARKER): a template is saved after this.
mkdir -p /run/uvmshim && : > /run/uvmshim/boot-done

# PID 1 from now on: a reaper that also keeps the exit status of the containers' init
# processes (re-parented to PID 1 after `crun create`; see uvmshim/agent/reaper.py).
PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 \
  exec /usr/bin/python3 -S -s -P -m uvmshim.agent.reaper </dev/null >/dev/console 2>&1
# Not reached unless the exec failed: busybox sh reaps every child, orphans included.
while :; do wait; sleep 1; done
