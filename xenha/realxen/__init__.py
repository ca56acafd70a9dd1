"""Real Xen 4.17 hosts under QEMU: the ground truth the simulated Xen host is checked against.

Why this exists: `xenha.sim` fakes `xl` and xenstored so that the operator and the agent can be
tested in seconds. These modules boot two real Xen hosts on this machine and run the same
scenarios against Debian's real `xl remus`, so the simulator's streams, messages and failover
behaviour can be compared with the real thing (tests/realxen/, marked `realxen`, deselected by
default: `pytest -m realxen`).

The flow:

1. `image.ensure()` builds, once, a Debian bookworm dom0 image in
   `~/.cache/xenha/realxen/<input-hash>/` (rebuilt only when its inputs change): debootstrap
   with Xen 4.17, the Debian kernel, busybox-static, socat, python3 and the project's Python
   dependencies in /opt/xenha/site; a tiny init (`scripts.DOM0_INIT`) instead of systemd; an
   ext4 image made with `mkfs.ext4 -d` (no loop mounts); the Xen ELF, kernel and initrd beside
   it; and a PV guest (`/root/guest/`: the Debian kernel plus a busybox initramfs printing
   `COUNTER n` twice a second, 64 MiB). Host tools it lacks (debootstrap, QEMU, socat) are
   installed with apt-get, so CI needs no manual step. About 3 minutes cold.
2. `qemu.TwoHosts` boots host A and host B from qcow2 overlays of that image under TCG
   (`-cpu qemu64,+svm`: /dev/kvm here cannot run Xen), joined by a socket netdev over
   127.0.0.1 (dom0 eth0: 10.99.0.1 and 10.99.0.2). Optionally each dom0 reaches the test
   kube-apiserver through a restricted user-mode NIC whose only way out is a guestfwd to
   127.0.0.1. The project's source is shared read-only over 9p (/mnt/xenha-src) and each host
   has a writable 9p share (/mnt/xenha-out) for logs, recorded streams and guest consoles.
   Every QEMU is ended by the PID it was started with, also if the test process dies.
3. `console.Console` drives each dom0 shell over the serial socket: 16-byte chunks 30 ms
   apart (Xen's serial ring is tiny), a marker whose echo differs from its output.
4. `record` is the first experiment: plain `xl remus` from A to a receiver on B that keeps
   both directions, parsed live with `xenha.stream`; tests/vectors/realxen/ holds what it saw.
   `vectors` cuts small test vectors out of a recording (page contents zeroed).
5. `lab` runs the product on them: the control plane and the operator on this machine, the
   agent in each dom0 (from the 9p source share) against the real `xl` and xenstored, with
   timings loosened for TCG. tests/realxen/test_failover.py protects the guest, cuts host A's
   power (SIGKILL of its QEMU) and checks that the guest goes on counting on host B and that
   the status says so; it writes its measurements to /tmp/xenha-realxen-<test>.json.

Debugging a run: with `XENHA_REALXEN_FIFO=/tmp/cmd`, lines like `a: xl list` written to that
FIFO run in host A's dom0 and their output is appended to /tmp/cmd.out; the replicators' logs
are copied to `<run>/hosts/xen-?-out/run/` every 2 s and the guest consoles to `.../console/`.

Resources: each host is a QEMU with 1280 MiB (RSS 1.1-1.5 GiB) on one vCPU; run one pair at a
time on a 2-core machine.
"""
