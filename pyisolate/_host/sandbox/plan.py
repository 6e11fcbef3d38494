"""One worker's confinement: the policy it runs under, what this machine can enforce of it, and
the parts that enforce it (rules the worker applies to itself before any extension code runs,
resource limits, a private temp dir).

``resolve`` narrows the host's policy by the extension's own (or refuses a wider one);
``prepare`` turns it into a ``Confinement``, which the worker's ``Worker`` owns and closes.
"""

from __future__ import annotations

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
    and seccomp (``workers.confine.probe()``), and what would enforce each limit (``limits``)."""
    return {**confine.probe(), "limits": _limits.mechanisms()}


@dataclass(frozen=True)
class Resolved:
    """The policy one extension runs under: the host's, narrowed by its own."""

    mode: str
    policy: SandboxPolicy
    limits: Limits


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
    mode = narrower_mode(config.sandbox_mode, host.sandbox_mode, f"ExtensionConfig.sandbox_mode {where}")
    policy = own.within(ceiling, f"ExtensionConfig.sandbox {where}")
    host_limits = host.limits if isinstance(host.limits, Limits) else None
    own_limits = config.limits if isinstance(config.limits, Limits) else Limits()
    return Resolved(mode, policy, own_limits.within(host_limits, where=f"ExtensionConfig.limits {where}"))


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
    it sets), ``env()`` into its environment, ``attach(pid)`` moves it into its resource
    groups before it is sent its boot message.
    """

    def __init__(self, name: str, mode: str, rules: dict[str, Any] | None, enforcement: _limits.Enforcement | None,
                 tmp: Path | None, enforced: list[str], missing: list[str]) -> None:  # fmt: skip
        self.name = name
        self.mode = mode
        self.rules = rules
        self.enforcement = enforcement
        self.tmp = tmp
        self.enforced = enforced
        self.missing = missing
        self._closed = False

    def boot(self) -> dict[str, Any]:
        """What the worker applies to itself before any extension code runs."""
        if self.rules is None and self.enforcement is None:
            return {}
        rlimits = self.enforcement.rlimits() if self.enforcement is not None else {}
        return {"confine": self.rules, "rlimits": {str(k): list(v) for k, v in rlimits.items()}}

    def env(self) -> dict[str, str]:
        """Variables for the worker: its private temp dir, and caches there too."""
        if self.tmp is None:
            return {}
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
    broker_endpoint: str, share_torch: bool,
) -> Confinement:  # fmt: skip
    """Plan one worker's confinement from its policy and what this machine offers.

    Raises:
        ExtensionLoadError: the mode is ``required`` and part of the policy cannot be enforced
            here; the message says what, why, and how to fix it on this system.
    """
    if resolved.mode == "disabled":
        return Confinement(name, "disabled", None, None, None, [], [])
    required = resolved.mode == "required"
    policy, limits = resolved.policy, resolved.limits
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

    offered = confine.probe()
    found = offered.get("landlock_abi")
    abi = found if isinstance(found, int) else 0
    if abi < 1:
        missing.append(f"filesystem: Landlock unavailable ({offered.get('landlock_reason') or 'no reason given'}); "
                       "fix: Linux 5.13+ with landlock in the lsm= boot parameter")
    if not policy.network and not offered.get("seccomp"):
        missing.append(f"network: seccomp unavailable ({offered.get('seccomp_reason')})")
    if abi < 6:
        missing.append("processes: signal scoping needs Landlock ABI 6 (Linux 6.12+)")
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
    read, write = system_paths()
    read += [venv, module_path, runtime, *_resolved_links(runtime), Path(sys.base_prefix), Path(sys.prefix)]
    read += [Path(os.path.realpath(venv / "bin" / "python")).parent.parent]
    read += [Path(f) for f in class_files]
    read += list(policy.readonly_paths)
    write += [tmp, *policy.writable_paths]
    if share_torch:
        write += [Path(p) for p in _GPU_DEVICES if os.path.exists(p)]
        write += sorted(Path("/dev").glob("nvidia[0-9]*"))
    ports: list[int] = []
    if broker_endpoint.startswith("tcp://"):
        ports.append(int(broker_endpoint.rsplit(":", 1)[1]))
    rules = {
        "read": _unique(read), "write": _unique(write), "network": policy.network, "tcp_connect": ports,
        "scope": True, "required": required,
    }  # fmt: skip
    enforced = ["filesystem"] * (abi >= 1) + ["network"] * bool(offered.get("seccomp")) + ["processes"] * (abi >= 6)
    if enforcement is not None:
        enforced += enforcement.enforced
    return Confinement(name, resolved.mode, rules, enforcement, tmp, enforced, missing)


def _unique(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, None] = {}
    for path in paths:
        seen.setdefault(str(path), None)
    return list(seen)
