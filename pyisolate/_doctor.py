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

__all__ = ["Check", "run_checks"]

OK, INFO, WARN, ERROR = "ok", "info", "warn", "error"
GIB = 1 << 30
# Linux sun_path holds 108 bytes, the last one NUL.
_SUN_PATH_MAX = 107
_SHM = Path("/dev/shm")


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
    from ._venv import uv_binary

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
    fix = ("give the container more shared memory: docker run --shm-size=8g ... (compose: shm_size; "
           "Kubernetes: an emptyDir with medium: Memory mounted at /dev/shm)")
    if not _SHM.is_dir():
        return Check("shm", ERROR, "/dev/shm does not exist: tensors and large arrays cannot be passed "
                     "as shared memory", "mount a tmpfs at /dev/shm, or " + fix)
    try:
        with tempfile.NamedTemporaryFile(dir=_SHM, prefix="pyisolate-doctor-"):
            pass
    except OSError as exc:
        return Check("shm", ERROR, f"/dev/shm is not writable: {exc}",
                     "make /dev/shm writable for this user (mode 1777)")
    vfs = os.statvfs(_SHM)
    total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    summary = f"/dev/shm is writable: {size(total)}, {size(free)} free"
    if total < GIB:
        return Check("shm", WARN, summary + "; under 1 GiB, large tensors and arrays will not fit", fix)
    return Check("shm", OK, summary)


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


def check_venv_root(root: Path) -> Check:
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a writable directory" if existing == root else f"cannot be created ({existing} is not writable)"
        return Check("venv_root", ERROR, f"venv root {root} {what}",
                     "pass --venv-root DIR (or set PYISOLATE_VENV_ROOT) to a writable directory")
    free = shutil.disk_usage(existing).free
    state = "exists" if existing == root else "will be created"
    summary = f"venv root {root} {state}; {size(free)} free on its disk"
    if free < GIB:
        return Check("venv_root", WARN, summary + ": venvs with large packages may not fit",
                     "free some space, or run: pyisolate env prune --older-than 30")
    return Check("venv_root", OK, summary)


def run_checks(venv_root: Path) -> list[Check]:
    """Run every check, in order; none raises."""
    checks: list[Callable[[], Check]] = [check_python, check_uv, check_ipc, check_shm]
    results = [check() for check in checks]
    torch_check, torch = check_torch()
    results += [torch_check, check_cuda(torch), check_venv_root(venv_root)]
    return results
