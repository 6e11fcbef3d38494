"""``pyisolate doctor``: check what pyisolate needs on this machine, and say how to fix each problem.

Each check returns one Check with a status: ``ok``; ``info`` (a fact, not a problem: an
optional part is absent); ``warn`` (works, but not well); ``error`` (something will fail).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._envs import uv_binary
from .._host import sandbox_offered
from .._wire import shm

__all__ = ["Check", "run_checks"]

OK, INFO, WARN, ERROR = "ok", "info", "warn", "error"
GIB = 1 << 30
# Linux sun_path holds 108 bytes, the last one NUL.
_SUN_PATH_MAX = 107


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, how it went, and what to do about it."""
    name: str
    status: str
    summary: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def size(n: float) -> str:
    """Bytes in words: 512 B, 1.5 MiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    return Check("python", OK, f"Python {version} at {sys.executable} (extension venvs use this interpreter)")


def check_uv() -> Check:
    fix = "reinstall it: pip install --force-reinstall 'uv>=0.9'"
    try:
        binary = uv_binary()
    except FileNotFoundError as exc:
        return Check("uv", ERROR, f"the uv binary cannot be found: {exc}", fix)
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("uv", ERROR, f"{binary} does not run: {exc}", fix)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return Check("uv", ERROR, f"{binary} --version exited with {done.returncode}: {tail[0]}", fix)
    return Check("uv", OK, f"{done.stdout.strip()} at {binary}")


def check_ipc() -> Check:
    import zmq

    if not zmq.has("ipc"):
        return Check("ipc", INFO, "this libzmq has no ipc transport: the broker listens on tcp://127.0.0.1")
    temp = tempfile.gettempdir()
    fix_dir = "point TMPDIR at a writable directory with a short path, e.g. export TMPDIR=/tmp"
    try:
        probe = tempfile.mkdtemp(prefix="pyisolate-doctor-")
        os.rmdir(probe)
    except OSError as exc:
        return Check("ipc", ERROR, f"cannot create the broker's endpoint directory in {temp}: {exc}", fix_dir)
    try:
        pid_digits = len(Path("/proc/sys/kernel/pid_max").read_text().strip())
    except OSError:
        pid_digits = 7
    # The broker binds ipc://<temp>/pyisolate-<pid>-<8 random>/broker (see broker/router.py).
    endpoint = os.path.join(temp, f"pyisolate-{'9' * pid_digits}-{'x' * 8}", "broker")
    length = len(os.fsencode(endpoint))
    if length > _SUN_PATH_MAX:
        return Check("ipc", ERROR, f"the broker's socket path would be {length} bytes, over the "
                     f"{_SUN_PATH_MAX} a unix socket allows (temp dir {temp})", fix_dir)
    return Check("ipc", OK, f"endpoint directory {temp} is writable; socket path {length} of "
                 f"{_SUN_PATH_MAX} bytes")


def check_shm() -> Check:
    """Shared memory for tensors and arrays: sealed memfds, not files in /dev/shm."""
    import resource

    try:
        shm.probe(1 << 20)
    except OSError as exc:
        fix = exc.fix if isinstance(exc, shm.NoRoom) else "use Linux 3.17 or later"
        return Check("shm", WARN, f"a sealed memfd cannot be made ({exc}): tensors and large arrays will "
                     "travel as copies through the socket", fix)
    available = _available_memory()
    try:
        limit, source = shm.pool_bound()
    except ValueError as exc:
        return Check("shm", WARN, f"PYISOLATE_SHM_POOL: {exc}", "set it to a size such as 512M, or unset it")
    pool = (f"a pool of up to {size(limit)} of reusable segments per process ({source})" if limit
            else f"no pool of reusable segments ({source} is 0): each fresh tensor gets a new segment")
    summary = ("tensors and arrays share sealed memfds (kernel memory: the size of /dev/shm does not matter); "
               + (f"{size(available)} of memory available" if available is not None else "memory available unknown")
               + f"; {pool}")
    if available is not None and available < GIB:
        return Check("shm", WARN, summary + ": large tensors and arrays will not fit and travel as copies",
                     "free memory, or give the container more (docker run --memory ...)")
    soft_fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft_fsize != resource.RLIM_INFINITY:
        return Check("shm", WARN, summary + f"; the file-size limit ({size(soft_fsize)}) makes larger values "
                     "travel as copies", "raise it: ulimit -f unlimited")
    return Check("shm", OK, summary)


def _available_memory() -> int | None:
    """Bytes of memory available to this process: MemAvailable, within a cgroup's limit if lower."""
    available: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            left = int(limit) - int(f.read())
        available = left if available is None else min(available, left)
    except (OSError, ValueError):  # no cgroup v2 limit ("max"), or not readable
        pass
    return available


def check_torch() -> tuple[Check, Any]:
    if importlib.util.find_spec("torch") is None:
        return Check("torch", INFO, "not installed: only share_torch and tensor passing need it",
                     "to use them: pip install 'pyisolate[torch]'"), None
    try:
        import torch
    except Exception as exc:  # a broken install: report it, do not crash the doctor
        return Check("torch", ERROR, f"installed but does not import: {type(exc).__name__}: {exc}",
                     "reinstall it: pip install --force-reinstall 'pyisolate[torch]'"), None
    return Check("torch", OK, f"torch {torch.__version__} imports (share_torch shares it with extensions)"), torch


def check_cuda(torch: Any) -> Check:
    if torch is None:
        return Check("cuda", INFO, "not available: torch is not importable")
    if getattr(torch.version, "cuda", None) is None:
        return Check("cuda", INFO, "not available: no CUDA device (this torch is a CPU-only build)")
    try:
        available = torch.cuda.is_available()
    except Exception as exc:
        return Check("cuda", WARN, f"torch.cuda.is_available() failed: {exc}",
                     "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    if not available:
        return Check("cuda", INFO, "not available: no CUDA device (CUDA tensors cannot be shared; CPU ones can)")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Check("cuda", OK, f"CUDA IPC available: {len(names)} device(s): {', '.join(names)}")


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest ancestor that does (where it would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_venv_root(root: Path) -> Check:
    existing = nearest_existing(root)
    fix = "pass --venv-root DIR (or set PYISOLATE_VENV_ROOT) to a writable directory"
    if not existing.is_dir():
        return Check("venv_root", ERROR, f"venv root {root} cannot be used: {existing} is not a directory", fix)
    # Make (and remove) a directory where pyisolate would: permission bits do not tell, for root,
    # a read-only mount or /proc, where even root cannot create anything.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pyisolate-doctor-", dir=existing))
    except OSError as exc:
        what = "is not writable" if existing == root else "cannot be created"
        return Check("venv_root", ERROR, f"venv root {root} {what}: making a directory in {existing} "
                     f"fails ({exc.strerror or exc})", fix)
    free = shutil.disk_usage(existing).free
    state = "exists" if existing == root else "will be created"
    summary = f"venv root {root} {state}; {size(free)} free on its disk"
    if free < GIB:
        return Check("venv_root", WARN, summary + ": venvs with large packages may not fit",
                     "free some space, or run: pyisolate env prune --older-than 30")
    return Check("venv_root", OK, summary)


def check_sandbox(offered: dict[str, Any]) -> Check:
    """What confines workers here (sandbox_mode 'required' refuses what is missing)."""
    found = offered.get("landlock_abi")
    abi = found if isinstance(found, int) else 0
    seccomp = bool(offered.get("seccomp"))
    parts = []
    if abi >= 1:
        covers = ["files"] + ["TCP"] * (abi >= 4) + ["signal scoping"] * (abi >= 6)
        parts.append(f"Landlock ABI {abi} ({', '.join(covers)})")
    if seccomp:
        parts.append("seccomp (sockets)")
    summary = "workers are confined by " + " and ".join(parts) if parts else "workers cannot be confined here"
    if offered.get("bwrap_problem") is None and offered.get("bwrap"):
        summary += f"; bubblewrap works ({offered['bwrap']}): sandbox_backends=('landlock', 'bwrap') adds namespaces"
    elif offered.get("bwrap_problem"):
        summary += f"; bubblewrap cannot be used ({offered['bwrap_problem']})"
    if abi >= 6 and seccomp:
        return Check("sandbox", OK, summary)
    if abi < 1:
        fix = (f"{offered.get('landlock_reason') or 'Landlock is unavailable'}; use Linux 5.13+ with landlock in "
               "the lsm= boot parameter (6.12+ for signal scoping)")
    elif abi < 6:
        fix = "signal scoping needs Linux 6.12+ (Landlock ABI 6); upgrade the kernel"
    else:
        fix = f"seccomp: {offered.get('seccomp_reason')}"
    return Check("sandbox", WARN, summary + "; sandbox_mode='required' will refuse to start workers", fix)


def check_limits(offered: dict[str, Any]) -> Check:
    """What enforces each resource limit here."""
    found = offered.get("limits") or {}
    said = ", ".join(f"{name.replace('_', ' ')}: {found.get(name) or 'none'}"
                     for name in ("memory", "cpu", "processes", "open_files"))  # fmt: skip
    if found.get("why"):
        return Check("limits", WARN, f"resource limits: {said}", str(found["why"]))
    return Check("limits", OK, f"resource limits: {said}")


def run_checks(venv_root: Path) -> list[Check]:
    """Run every check, in order; none raises."""
    offered = sandbox_offered() if sys.platform.startswith("linux") else {"landlock_reason": sys.platform}
    checks: list[Callable[[], Check]] = [check_python, check_uv, check_ipc, check_shm,
                                         lambda: check_sandbox(offered), lambda: check_limits(offered)]
    results = [check() for check in checks]
    torch_check, torch = check_torch()
    results += [torch_check, check_cuda(torch), check_venv_root(venv_root)]
    return results
