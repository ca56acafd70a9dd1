"""Build the control plane binaries from the Go module proxy, cached by version.

The versions live in one file, ``tools/controlplane/versions.json``; each component there is a
small Go wrapper module beside it (``kube``, ``etcd``, ``helm``) whose go.mod pins the same
version. A build lands in ``<cache>/bin/<component>-<version>/`` and is reused for as long as
the wrapper module's inputs (versions entry, go.mod, go.sum, Go sources) are unchanged, so a
version bump, or a go.sum edit, rebuilds exactly the component it touches.

The cache root is ``$XENHA_CACHE`` if set, else ``$XDG_CACHE_HOME/xenha``, else
``~/.cache/xenha``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

STAMP = ".xenha-build.json"
COMPONENT_ORDER = ("etcd", "kube", "helm")
# The binaries the running control plane needs; kubectl rides along because tests and the lab
# use it to see what a user would see.
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")


class BuildError(RuntimeError):
    """A component could not be built (or its pins disagree)."""


class MissingBinaryError(RuntimeError):
    """A binary is not in the cache and building was not allowed."""


@dataclass(frozen=True)
class Component:
    name: str
    module: str
    version: str
    # binary name -> Go package to build (relative to the wrapper module, or an import path)
    binaries: Mapping[str, str]
    source_dir: Path
    # -X package.var=value link settings; see versions.json for the placeholders.
    ldflags_x: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"

    def bin_dir(self, cache: Path | None = None) -> Path:
        return (cache or cache_root()) / "bin" / self.key


def tools_dir() -> Path:
    """Where the Go wrapper modules live (the repository's ``tools/controlplane``)."""
    override = os.environ.get("XENHA_TOOLS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "tools" / "controlplane"


def cache_root() -> Path:
    override = os.environ.get("XENHA_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "xenha"


def load_components(tools: Path | None = None) -> dict[str, Component]:
    tools = tools or tools_dir()
    try:
        raw: dict[str, Any] = json.loads((tools / "versions.json").read_text())
    except FileNotFoundError as exc:
        raise BuildError(f"no versions.json in {tools} (set XENHA_TOOLS_DIR?)") from exc
    components: dict[str, Component] = {}
    for name, entry in raw.items():
        if name.startswith("/"):
            continue
        components[name] = Component(
            name=name,
            module=str(entry["module"]),
            version=str(entry["version"]),
            binaries=dict(entry["binaries"]),
            source_dir=tools / name,
            ldflags_x=dict(entry.get("ldflags_x", {})),
        )
    return components


def component_of(binary: str, components: Mapping[str, Component]) -> Component:
    for component in components.values():
        if binary in component.binaries:
            return component
    raise KeyError(f"no component builds {binary!r}")


# --- pins ----------------------------------------------------------------------------------

_REQUIRE = re.compile(r"^\s*(?:require\s+)?(\S+)\s+(v\S+)", re.MULTILINE)
_REPLACE = re.compile(r"^\s*(k8s\.io/\S+)\s*=>\s*(\S+)\s+(v\S+)", re.MULTILINE)


def check_pins(component: Component) -> None:
    """Refuse to build when go.mod does not say what versions.json says.

    The cache key comes from versions.json while the build obeys go.mod; if they drift, a
    binary would be cached under a version it is not.
    """
    gomod = (component.source_dir / "go.mod").read_text()
    required = {m: v for m, v in _REQUIRE.findall(_strip_replace_block(gomod))}
    if required.get(component.module) != component.version:
        raise BuildError(
            f"{component.source_dir / 'go.mod'} requires {component.module} "
            f"{required.get(component.module)!r}, versions.json says {component.version}"
        )
    if component.module == "k8s.io/kubernetes":
        # Staging modules are published as v0.<minor>.<patch> for kubernetes v1.<minor>.<patch>.
        staging = "v0." + component.version.split(".", 1)[1]
        for old, new, version in _REPLACE.findall(gomod):
            if old != new or version != staging:
                raise BuildError(
                    f"{component.source_dir / 'go.mod'}: replace {old} => {new} {version}; "
                    f"expected {old} => {old} {staging}"
                )


def staging_replace_block(upstream_gomod: str, version: str) -> str:
    """The replace block a wrapper of k8s.io/kubernetes@version needs.

    Upstream requires each staging module at v0.0.0 and replaces it with a path inside its
    own repository; outside it, each must point at the release published with it.
    """
    staging = "v0." + version.lstrip("v").split(".", 1)[1]
    names = re.findall(r"^\s*(k8s\.io/\S+)\s*=>\s*\./staging/", upstream_gomod, re.MULTILINE)
    if not names:
        raise BuildError(f"k8s.io/kubernetes {version}: no staging replaces in its go.mod")
    return "replace (\n" + "".join(f"\t{n} => {n} {staging}\n" for n in names) + ")"


def pin(name: str, version: str, *, out: TextIO | None = None) -> None:
    """Move one component to ``version``: versions.json, go.mod (+ kube's replaces), go.sum."""
    out = out or sys.stderr
    tools = tools_dir()
    component = load_components(tools)[name]
    go = go_binary()
    env = dict(os.environ, GOWORK="off")
    gomod_path = component.source_dir / "go.mod"
    gomod = re.sub(
        rf"^(\s*(?:require\s+)?{re.escape(component.module)}\s+)v\S+",
        rf"\g<1>{version}",
        gomod_path.read_text(),
        count=1,
        flags=re.MULTILINE,
    )
    if component.module == "k8s.io/kubernetes":
        print(f"==> reading k8s.io/kubernetes@{version}'s go.mod", file=out)
        info = subprocess.run(
            [go, "mod", "download", "-json", f"{component.module}@{version}"],
            cwd=component.source_dir,
            env=env,
            capture_output=True,
            text=True,
        )
        if info.returncode != 0:
            raise BuildError(f"go mod download {component.module}@{version}:\n{info.stdout}")
        upstream = Path(json.loads(info.stdout)["GoMod"]).read_text()
        block = staging_replace_block(upstream, version)
        gomod = re.sub(r"^replace\s*\((.|\n)*?^\)", block, gomod, count=1, flags=re.MULTILINE)
    gomod_path.write_text(gomod)
    print(f"==> go mod tidy in {component.source_dir}", file=out)
    tidy = subprocess.run(
        [go, "mod", "tidy"], cwd=component.source_dir, env=env, capture_output=True, text=True
    )
    if tidy.returncode != 0:
        raise BuildError(f"go mod tidy failed:\n{tidy.stderr[-4000:]}")
    versions_path = tools / "versions.json"
    versions = json.loads(versions_path.read_text())
    versions[name]["version"] = version
    versions_path.write_text(json.dumps(versions, indent=2) + "\n")
    check_pins(load_components(tools)[name])
    print(f"==> {name} pinned to {version}; `xenha controlplane build` builds it", file=out)


def _strip_replace_block(gomod: str) -> str:
    return re.sub(r"^replace\s*\((.|\n)*?^\)", "", gomod, flags=re.MULTILINE)


def inputs_digest(component: Component) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {
                "module": component.module,
                "version": component.version,
                "bins": component.binaries,
                "x": component.ldflags_x,
            },
            sort_keys=True,
        ).encode()
    )
    for path in sorted(component.source_dir.glob("*")):
        if path.name in {"go.mod", "go.sum"} or path.suffix == ".go":
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# --- cache ---------------------------------------------------------------------------------


def cached(component: Component, cache: Path | None = None) -> bool:
    """True when every binary of ``component`` is in the cache and was built from these inputs."""
    directory = component.bin_dir(cache)
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (FileNotFoundError, ValueError):
        return False
    if not all(os.access(directory / b, os.X_OK) for b in component.binaries):
        return False
    if not component.source_dir.is_dir():
        # Installed without the wrapper modules (e.g. a copied cache): trust the version.
        return bool(stamp.get("version") == component.version)
    return bool(stamp.get("inputs") == inputs_digest(component))


def build_allowed() -> bool:
    """CI must find the binaries prebuilt: a silent 20-minute build there hides a broken step."""
    return os.environ.get("CI", "").strip().lower() not in {"1", "true", "yes"}


def ensure(
    binaries: Iterable[str] = CONTROL_PLANE,
    *,
    build: bool = True,
    jobs: int | None = None,
    out: TextIO | None = None,
) -> dict[str, Path]:
    """Return binary name -> path, building missing components first when ``build`` is true."""
    components = load_components()
    wanted = list(binaries)
    needed: dict[str, Component] = {}
    for binary in wanted:
        component = component_of(binary, components)
        needed[component.name] = component
    missing = [c for c in needed.values() if not cached(c)]
    if missing and not build:
        names = ", ".join(f"{c.key} ({', '.join(c.binaries)})" for c in missing)
        raise MissingBinaryError(
            f"control plane binaries not built: {names} in {cache_root() / 'bin'}; "
            "run `xenha controlplane build` first"
        )
    for component in sorted(missing, key=_order):
        build_component(component, jobs=jobs, out=out)
    return {b: component_of(b, components).bin_dir() / b for b in wanted}


def _order(component: Component) -> int:
    name = component.name
    return COMPONENT_ORDER.index(name) if name in COMPONENT_ORDER else len(COMPONENT_ORDER)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        # Two pytest sessions (or the lab and a test run) may both find the cache cold; one
        # builds, the other waits and then finds it warm.
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def go_binary() -> str:
    go = os.environ.get("GO") or shutil.which("go")
    if not go:
        raise BuildError("the Go toolchain (`go`, 1.26 or newer) is needed to build the binaries")
    return go


def default_jobs() -> int:
    env = os.environ.get("XENHA_BUILD_JOBS")
    if env:
        return max(1, int(env))
    # The kube build peaks at several GiB per compile job; beyond 4 it only trades memory for
    # little time.
    return max(1, min(os.cpu_count() or 1, 4))


def build_component(
    component: Component,
    *,
    jobs: int | None = None,
    out: TextIO | None = None,
    cache: Path | None = None,
) -> float:
    """Build every binary of ``component`` into the cache; return the seconds it took."""
    out = out or sys.stderr
    check_pins(component)
    final = component.bin_dir(cache)
    with _locked(final.parent / f".{component.key}.lock"):
        if cached(component, cache):
            return 0.0
        go = go_binary()
        jobs = jobs or default_jobs()
        env = dict(os.environ, CGO_ENABLED="0", GOWORK="off")
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{component.key}.", dir=final.parent))
        staging.chmod(0o755)
        try:
            ldflags = _ldflags(go, component, env)
            per_binary: dict[str, float] = {}
            total = len(component.binaries)
            for index, (binary, package) in enumerate(component.binaries.items(), 1):
                label = f"{component.key} [{index}/{total}] {binary}"
                t0 = time.monotonic()
                _go_build(
                    go,
                    component.source_dir,
                    package,
                    staging / binary,
                    jobs,
                    env,
                    ldflags,
                    label,
                    out,
                )
                per_binary[binary] = round(time.monotonic() - t0, 1)
            seconds = round(time.monotonic() - started, 1)
            stamp = {
                "component": component.name,
                "module": component.module,
                "version": component.version,
                "inputs": inputs_digest(component),
                "go": _go_version(go, env),
                "seconds": seconds,
                "seconds_per_binary": per_binary,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"==> {component.key}: built in {_fmt(seconds)} -> {final}", file=out, flush=True)
        return seconds


_TIME_FORMAT = '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}'


def _ldflags(go: str, component: Component, env: Mapping[str, str]) -> str:
    flags = ["-s", "-w"]
    if component.ldflags_x:
        major, _, rest = component.version.lstrip("v").partition(".")
        minor = rest.partition(".")[0]
        # The module's publication time: a build date that is the same on every machine.
        published = subprocess.run(
            [go, "list", "-m", "-f", _TIME_FORMAT, component.module],
            cwd=component.source_dir,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        values = {
            "version": component.version,
            "major": major,
            "minor": minor,
            "time": published or "1970-01-01T00:00:00Z",
        }
        for var, template in component.ldflags_x.items():
            flags.append(f"-X={var}={template.format(**values)}")
    return " ".join(flags)


def _go_version(go: str, env: Mapping[str, str]) -> str:
    result = subprocess.run(
        [go, "env", "GOVERSION"], env=env, capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


def _count_packages(go: str, cwd: Path, package: str, env: Mapping[str, str]) -> int | None:
    result = subprocess.run(
        [go, "list", "-deps", package], cwd=cwd, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        return None
    return len(result.stdout.split())


def _go_build(
    go: str,
    cwd: Path,
    package: str,
    output: Path,
    jobs: int,
    env: Mapping[str, str],
    ldflags: str,
    label: str,
    out: TextIO,
) -> None:
    progress = _Progress(label, out)
    progress.note("resolving modules")
    # Downloading first gives a package count for the progress line and separates "the proxy
    # is unreachable" from "the code does not compile".
    download = subprocess.run(
        [go, "mod", "download"], cwd=cwd, env=env, capture_output=True, text=True
    )
    if download.returncode != 0:
        raise BuildError(f"{label}: go mod download failed:\n{download.stderr[-4000:]}")
    progress.total = _count_packages(go, cwd, package, env)
    argv = [
        go,
        "build",
        f"-p={jobs}",
        "-v",
        "-trimpath",
        "-buildvcs=false",
        f"-ldflags={ldflags}",
        "-o",
        str(output),
        package,
    ]
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            # `go build -v` names each package as it is compiled; anything else is a message.
            if line and " " not in line and ":" not in line:
                progress.package()
            else:
                tail.append(line)
                progress.note(line)
        code = proc.wait()
    progress.done()
    if code != 0:
        raise BuildError(f"{label}: go build failed ({code}):\n" + "\n".join(tail))


class _Progress:
    """One status line: rewritten in place on a terminal, a line every 15 s in a log."""

    def __init__(self, label: str, out: TextIO) -> None:
        self.label = label
        self.out = out
        self.tty = out.isatty()
        self.started = time.monotonic()
        self.last = 0.0
        self.count = 0
        self.total: int | None = None

    def _line(self) -> str:
        # An upper bound: packages already in the Go build cache are never printed.
        of = f" of <={self.total}" if self.total else ""
        elapsed = _fmt(time.monotonic() - self.started)
        return f"==> {self.label}: {self.count}{of} packages compiled, {elapsed}"

    def package(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.tty and now - self.last >= 0.2:
            self.out.write("\r\033[K" + self._line())
            self.out.flush()
            self.last = now
        elif not self.tty and now - self.last >= 15:
            print(self._line(), file=self.out, flush=True)
            self.last = now

    def note(self, message: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        print(f"==> {self.label}: {message}", file=self.out, flush=True)

    def done(self) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        print(self._line().replace("packages compiled", "packages compiled, done"), file=self.out)
        self.out.flush()


def _fmt(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def build_all(
    names: Iterable[str] | None = None,
    *,
    jobs: int | None = None,
    force: bool = False,
    out: TextIO | None = None,
) -> dict[str, float]:
    """Build the named components (default: all); return component key -> seconds (0 = cached)."""
    out = out or sys.stderr
    components = load_components()
    selected = [components[n] for n in names] if names else list(components.values())
    result: dict[str, float] = {}
    for component in sorted(selected, key=_order):
        if force and component.bin_dir().exists():
            shutil.rmtree(component.bin_dir())
        if cached(component):
            print(f"==> {component.key}: cached in {component.bin_dir()}", file=out)
            result[component.key] = 0.0
        else:
            result[component.key] = build_component(component, jobs=jobs, out=out)
    return result


def describe(progress: Callable[[str], None] = print) -> None:
    for component in load_components().values():
        state = "cached" if cached(component) else "missing"
        progress(f"{component.key:<22} {state:<8} {component.bin_dir()}")
