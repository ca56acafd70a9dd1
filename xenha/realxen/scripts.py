"""The text baked into the images: dom0's init, the guest's init and its xl config.

These strings are inputs of the image hash (image.py), so editing one rebuilds the image.
"""

from __future__ import annotations

# dom0's PID 1 (`init=/sbin/xenha-init`). systemd took 100 s to a shell under TCG, mostly
# ifupdown waiting; this reaches one in about 40 s. Kernel parameters it reads:
#   xenha.host=NAME  xenha.ip=ADDR/LEN (the private segment between the hosts, on eth0)
#   xenha.apiport=PORT (forward 127.0.0.1:PORT to the user-mode netdev's guestfwd on eth1,
#   so the test control plane's kubeconfig and certificate work unchanged inside dom0)
# 9p shares, when QEMU offers them: xenha-src (the project, read-only) and xenha-out (per host).
DOM0_INIT = r"""#!/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
export PATH HOME
# The initramfs may have mounted some of these already.
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
# `xl console` fails without it.
mkdir -p /run/lock /run/xen /var/log/xen /run/xenha
mount -o remount,rw / 2>/dev/null
arg() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
host=$(arg xenha.host); ip=$(arg xenha.ip); apiport=$(arg xenha.apiport)
[ -n "$host" ] && hostname "$host" && echo "$host" > /etc/hostname
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback \
         virtio_net virtio_blk 9p 9pnet_virtio; do
    modprobe -q "$m" 2>/dev/null
done
grep -q xenfs /proc/mounts || mount -t xenfs xenfs /proc/xen 2>/dev/null
ip link set lo up
if [ -n "$ip" ]; then
    ip link set eth0 up
    ip addr add "$ip" dev eth0
fi
if ip link show eth1 >/dev/null 2>&1; then
    # QEMU user-mode network, restricted: only its guestfwd rules lead anywhere.
    ip link set eth1 up
    ip addr add 10.0.2.15/24 dev eth1
fi
if [ -n "$apiport" ]; then
    socat TCP-LISTEN:"$apiport",bind=127.0.0.1,reuseaddr,fork TCP:10.0.2.100:6443 \
        </dev/null >/dev/null 2>&1 &
fi
for tag in xenha-src xenha-out; do
    mkdir -p /mnt/$tag
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 $tag /mnt/$tag 2>/dev/null \
        || rmdir /mnt/$tag
done
# The harness may leave a hook in the output share (e.g. xenconsoled logging settings), so
# such choices need no image rebuild.
[ -r /mnt/xenha-out/dom0-hook.sh ] && . /mnt/xenha-out/dom0-hook.sh
/etc/init.d/xen start >/run/xen-start.log 2>&1
echo "XENHA-DOM0-UP host=$host"
while true; do
    setsid -c /bin/sh -l </dev/hvc0 >/dev/hvc0 2>&1
    sleep 1
done
"""

DOM0_PROFILE = r"""export PS1='# '
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/mnt/xenha-src:/mnt/xenha-src/agent:/mnt/xenha-src/operator:/opt/xenha/site
export PYTHONDONTWRITEBYTECODE=1
export TERM=dumb
stty cols 4000 2>/dev/null
"""

# The guest: busybox alone in an initramfs, counting on its console twice a second, so the
# count on host B after a failover tells how much of the guest's life survived.
GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /tmp
/bin/busybox mount -t proc proc /proc
n=0
while true; do
    n=$((n + 1))
    echo "COUNTER $n"
    /bin/busybox sleep 0.5
done
"""

GUEST_NAME = "counter"
# The Debian kernel alone takes 0x3a00 pages (58 MiB) to load, so 64 MiB fails in
# xc_dom_chk_alloc_pages ("segment kernel too large"); the first full copy grows with this.
GUEST_MEMORY_MIB = 96
GUEST_DIR = "/root/guest"


def guest_config(memory_mib: int = GUEST_MEMORY_MIB, name: str = GUEST_NAME) -> str:
    """The guest's xl config. Not baked into the image: the harness writes it to the output
    share, so its settings can change without a rebuild. The Debian kernel doubles as the PV
    guest kernel (hvc console and PV drivers are built in)."""
    return f"""name = "{name}"
type = "pv"
memory = {memory_mib}
vcpus = 1
kernel = "{GUEST_DIR}/vmlinuz"
ramdisk = "{GUEST_DIR}/initrd.gz"
extra = "console=hvc0 quiet"
on_crash = "preserve"
"""
