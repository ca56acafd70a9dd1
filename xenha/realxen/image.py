"""Build (once) the Debian bookworm dom0 image and the boot files for real Xen under QEMU.

The result lives in ``<cache>/realxen/<input-hash>/`` (cache root as for the control plane:
``$XENHA_CACHE``, ``$XDG_CACHE_HOME/xenha`` or ``~/.cache/xenha``) and is reused until an input
changes: the package lists, the suite, the scripts baked into the image, the project's Python
dependencies or BUILD_VERSION. Downloaded .debs are kept in ``<cache>/realxen/debs`` so a rebuild
does not fetch them again; older image directories are removed once a new one is complete.

Run ``python -m xenha.realxen.image`` to build ahead of time (it prints the directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from xenha.controlplane.build import cache_root
from xenha.realxen import cpio, scripts

# Bump when the build steps change in a way the other inputs do not show.
BUILD_VERSION = 1
SUITE = "bookworm"
DOM0_PACKAGES = (
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xenstore-utils",
    "linux-image-amd64",
    "busybox-static",
    "socat",
    "iproute2",
    "procps",
    "python3",
    "kmod",
)
HOST_TOOLS = {
    # command -> Debian package
    "debootstrap": "debootstrap",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "socat": "socat",
}
COMPLETE = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ImageError(RuntimeError):
    """The image could not be built."""


@dataclass(frozen=True)
class Image:
    """A complete build: everything qemu.py needs to boot a host."""

    directory: Path
    manifest: dict[str, object]

    @property
    def disk(self) -> Path:
        """Raw ext4 base image; never written to (each host boots a qcow2 overlay)."""
        return self.directory / "dom0.img"

    @property
    def xen(self) -> Path:
        return self.directory / "xen"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def guest_initrd(self) -> Path:
        return self.directory / "guest-initrd.gz"


def log(message: str) -> None:
    print(f"[realxen] {message}", file=sys.stderr, flush=True)


def python_dependencies(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    with pyproject.open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return sorted(str(d) for d in deps)


def _guest_initramfs(busybox: bytes) -> bytes:
    # The guest runs the rootfs's own busybox-static; only the archive around it is built here.
    return cpio.initramfs(
        [
            cpio.directory("bin"),
            cpio.directory("dev"),
            cpio.directory("proc"),
            cpio.directory("sys"),
            cpio.directory("tmp"),
            cpio.chardev("dev/console", 5, 1),
            cpio.file("bin/busybox", busybox),
            cpio.symlink("bin/sh", "busybox"),
            cpio.file("init", scripts.GUEST_INIT.encode()),
        ]
    )


def inputs() -> dict[str, object]:
    return {
        "build_version": BUILD_VERSION,
        "suite": SUITE,
        "packages": list(DOM0_PACKAGES),
        "python": python_dependencies(),
        "dom0_init": scripts.DOM0_INIT,
        "dom0_profile": scripts.DOM0_PROFILE,
        "guest_init": scripts.GUEST_INIT,
    }


def input_hash() -> str:
    blob = json.dumps(inputs(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def realxen_cache() -> Path:
    return cache_root() / "realxen"


def cached() -> Image | None:
    """The current build if it is complete, else None (never builds)."""
    directory = realxen_cache() / input_hash()
    manifest = directory / COMPLETE
    if not manifest.is_file():
        return None
    return Image(directory, json.loads(manifest.read_text()))


def debian_mirror() -> str:
    """The mirror apt already uses (override: $XENHA_REALXEN_MIRROR)."""
    override = os.environ.get("XENHA_REALXEN_MIRROR")
    if override:
        return override
    for uri, suites in _apt_sources():
        if SUITE in suites and "security" not in uri:
            return uri
    return "http://deb.debian.org/debian"


def _apt_sources() -> Iterator[tuple[str, list[str]]]:
    apt = Path("/etc/apt")
    one_line = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                rest = [w for w in words[1:] if not w.startswith("[")]
                if len(rest) >= 2:
                    yield rest[0], [rest[1]]
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split():
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split()


def ensure_host_tools(extra: Sequence[str] = ()) -> None:
    """apt-get install what is missing (CI starts from a machine without QEMU)."""
    missing = sorted(
        {pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None} | set(extra)
    )
    if not missing:
        return
    log(f"installing host packages with apt-get: {' '.join(missing)}")
    if os.geteuid() != 0:
        raise ImageError(f"need root to install {' '.join(missing)} (or install them yourself)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, quiet: bool = False) -> None:
    """Run with output passed through line by line, prefixed (the build's progress)."""
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-30:], line.rstrip()]
        if not quiet:
            print(f"  | {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait():
        detail = "\n".join(tail)
        raise ImageError(f"{cmd[0]} failed with status {proc.returncode}:\n{detail}")


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure() -> Image:
    """The image for the current inputs, building it if needed (about 5 minutes cold)."""
    image = cached()
    if image is not None:
        return image
    root = realxen_cache()
    with _lock(root):
        image = cached()  # another process may have built it while we waited
        if image is not None:
            return image
        image = _build(root, input_hash())
        _prune(root, keep=image.directory.name)
        return image


def _prune(root: Path, keep: str) -> None:
    for entry in root.iterdir():
        if entry.is_dir() and re.fullmatch(r"[0-9a-f]{16}", entry.name) and entry.name != keep:
            log(f"removing the outdated image {entry}")
            shutil.rmtree(entry, ignore_errors=True)


def _build(root: Path, key: str) -> Image:
    started = time.monotonic()
    ensure_host_tools()
    directory = root / key
    shutil.rmtree(directory, ignore_errors=True)  # a half-built directory from a crash
    directory.mkdir(parents=True)
    rootfs = directory / "rootfs"
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.monotonic() - t0, 1)
        log(f"{name}: {timings[name]} s")

    mirror = debian_mirror()
    log(f"debootstrap {SUITE} from {mirror} into {rootfs} (about 3 minutes)")
    t0 = time.monotonic()
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(DOM0_PACKAGES)}",
            f"--cache-dir={debs}",
            SUITE,
            str(rootfs),
            mirror,
        ]
    )
    step("debootstrap", t0)

    t0 = time.monotonic()
    log("installing the project's Python dependencies into /opt/xenha/site")
    site = rootfs / "opt/xenha/site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
            str(site),
            *python_dependencies(),
        ]
    )
    step("python", t0)

    t0 = time.monotonic()
    log("configuring dom0 and the guest")
    boot = _configure(rootfs)
    for name, src in boot.items():
        shutil.copyfile(src, directory / name)
    xen_gz = _one(rootfs, "boot/xen-4.17-amd64.gz")
    # QEMU's multiboot loader wants the plain ELF.
    _run(["sh", "-c", f"zcat '{xen_gz}' > '{directory / 'xen'}'"], quiet=True)
    step("configure", t0)

    t0 = time.monotonic()
    used = int(subprocess.check_output(["du", "-sb", str(rootfs)]).split()[0])
    size_mib = max(2048, (used * 3 // 2) // (1 << 20) + 512)
    log(f"making the ext4 image ({used >> 20} MiB of files in a {size_mib} MiB image)")
    disk = directory / "dom0.img"
    with disk.open("wb") as f:
        f.truncate(size_mib << 20)
    _run(["mkfs.ext4", "-q", "-F", "-L", "xenha-dom0", "-d", str(rootfs), str(disk)])
    step("mkfs", t0)

    manifest: dict[str, object] = {
        "inputs": inputs(),
        "hash": key,
        "mirror": mirror,
        "versions": _versions(rootfs),
        "timings_s": {**timings, "total": round(time.monotonic() - started, 1)},
    }
    shutil.rmtree(rootfs)
    (directory / COMPLETE).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"image ready in {directory} ({manifest['timings_s']})")
    return Image(directory, manifest)


def _one(rootfs: Path, pattern: str) -> Path:
    found = sorted(glob.glob(str(rootfs / pattern)))
    if not found:
        raise ImageError(f"{pattern} not found in the root filesystem")
    return Path(found[-1])


def _configure(rootfs: Path) -> dict[str, Path]:
    """Write the init and the guest into the root filesystem; return the boot files."""
    init = rootfs / "sbin/xenha-init"
    init.write_text(scripts.DOM0_INIT)
    init.chmod(0o755)
    (rootfs / "etc/profile.d/xenha.sh").write_text(scripts.DOM0_PROFILE)
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime 0 1\n")
    (rootfs / "etc/hostname").write_text("xenha\n")
    kernel = _one(rootfs, "boot/vmlinuz-*")
    initrd = _one(rootfs, "boot/initrd.img-*")
    guest = rootfs / scripts.GUEST_DIR.lstrip("/")
    guest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel, guest / "vmlinuz")
    busybox = (rootfs / "bin/busybox").read_bytes()
    (guest / "initrd.gz").write_bytes(_guest_initramfs(busybox))
    return {"vmlinuz": kernel, "initrd.img": initrd, "guest-initrd.gz": guest / "initrd.gz"}


def _versions(rootfs: Path) -> dict[str, str]:
    status = (rootfs / "var/lib/dpkg/status").read_text()
    wanted = {"xen-utils-4.17", "linux-image-amd64", "python3", "busybox-static"}
    out: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Package") in wanted:
            out[fields["Package"]] = fields.get("Version", "")
    return out


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] in {"-h", "--help"}:
        print("usage: xenha realxen build\n\nBuild (or reuse) the cached real Xen dom0 image.")
        return 0
    try:
        image = ensure()
    except ImageError as exc:
        log(str(exc))
        return 1
    print(image.directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
