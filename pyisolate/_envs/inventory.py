"""The venvs under a venv root, for ``pyisolate env``: list them, remove some, rebuild one.

Works on the layout ``pyisolate._envs.venv`` writes (``<root>/<name>/`` with its ready marker,
``<root>/.locks/``, ``<root>/.runtime/``). It never removes anything outside the root, never
follows a symlink, and removes a venv only while holding its build lock, by renaming it to
``<root>/.trash-<name>-<random>`` first (atomic: a host sees the whole venv or none) and then
deleting that.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .._sources import PackageSources
from .._validate import validate_extension_name
from ..errors import ConfigError
from . import locks as _locks
from . import venv as _venv

__all__ = ["VenvInfo", "VenvBusyError", "in_use", "list_venvs", "looks_like_root", "remove_venv", "trash"]

READY, STALE, INCOMPLETE = "ready", "stale", "incomplete"
_TRASH = ".trash-"


class VenvBusyError(Exception):
    """A venv is in use by a running process, or being built; it was left alone."""


@dataclass(frozen=True)
class VenvInfo:
    """One venv under the root, as ``env list`` shows it.

    ``status`` is ``ready`` (a host would reuse it), ``stale`` (built for another Python,
    uv or set of index variables: the next load rebuilds it) or ``incomplete`` (no ready
    marker: a build was interrupted). ``last_used`` is a Unix time. ``sources``: the package
    sources it was built from.
    """

    name: str
    path: Path
    status: str
    dependencies: tuple[str, ...]
    share_torch: bool
    size_bytes: int
    last_used: float
    created: float | None
    sources: PackageSources = PackageSources()


def looks_like_root(root: Path) -> bool:
    """Tell whether ``root`` is a directory that pyisolate has built venvs in."""
    if not root.is_dir():
        return False
    if (root / ".locks").is_dir() or (root / ".runtime").is_dir():
        return True
    return any(_marker(entry) is not None for entry in _venv_entries(root))


def _venv_entries(root: Path) -> Iterator[Path]:
    """Directories of the root that are venvs with valid extension names (no symlinks)."""
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            validate_extension_name(entry.name)
        except ConfigError:
            continue
        if (entry / _venv._MARKER).is_file() or (entry / "pyvenv.cfg").is_file():
            yield entry


def _marker(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads((path / _venv._MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def disk_usage(path: Path) -> int:
    """Bytes on disk under ``path``: each inode once, symlinks not followed."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                stack.append(Path(entry.path))
    return total


def list_venvs(root: Path) -> list[VenvInfo]:
    """Describe every venv under ``root`` (none if it does not exist), sorted by name."""
    if not root.is_dir():
        return []
    found = []
    for path in _venv_entries(root):
        data = _marker(path)
        if data is None:
            found.append(VenvInfo(path.name, path, INCOMPLETE, (), False, disk_usage(path), _last_used(path), None))
            continue
        raw = data.get("dependencies")
        deps = tuple(str(d) for d in raw) if isinstance(raw, list) else ()
        share_torch = data.get("share_torch") is True
        try:
            sources = PackageSources.from_dict(data.get("sources"))
            current: str | None = _venv._fingerprint(deps, share_torch=share_torch, sources=sources)
        except ConfigError:  # unreadable: a rebuild from the extension's directory is needed
            sources, current = PackageSources(), None
        status = READY if data.get("fingerprint") == current and (path / "bin" / "python").exists() else STALE
        created = data.get("created")
        found.append(VenvInfo(
            path.name, path, status, deps, share_torch, disk_usage(path), _last_used(path),
            float(created) if isinstance(created, (int, float)) else None, sources,
        ))  # fmt: skip
    return found


def _last_used(path: Path) -> float:
    """When a host last reused the venv, else when it was built."""
    for name in (_venv._USED, _venv._MARKER):
        try:
            return (path / name).stat().st_mtime
        except OSError:
            continue
    return path.lstat().st_mtime


def in_use(path: Path) -> list[int]:
    """Pids of the processes running an interpreter of the venv at ``path`` (Linux /proc)."""
    prefixes = {f"{path.absolute()}{os.sep}", f"{path.resolve()}{os.sep}"}
    pids = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                    argv0 = handle.read().split(b"\0", 1)[0].decode(errors="replace")
            except OSError:
                continue
            if any(argv0.startswith(prefix) for prefix in prefixes):
                pids.append(int(entry.name))
    return pids


def remove_venv(root: Path, name: str) -> None:
    """Remove the venv ``name`` under ``root``, holding its build lock.

    Raises:
        VenvBusyError: a process runs from it, or another process holds its lock (building).
        ConfigError: the name is invalid or resolves outside the root.
        OSError: it could not be removed.
    """
    target = _venv.venv_dir(root, name)
    if target.is_symlink() or not target.is_dir():
        raise ConfigError(f"{target} is not a venv directory (symlinks are never followed)")
    pids = in_use(target)
    if pids:
        raise VenvBusyError(f"in use by pid {', '.join(map(str, pids))}; stop those processes first")
    fd = os.open(_locks.lock_path(root, name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VenvBusyError("another process is building or checking it; try again later") from None
        doomed = root / f"{_TRASH}{name}-{secrets.token_hex(4)}"
        os.rename(target, doomed)
    finally:
        os.close(fd)  # releases the lock
    shutil.rmtree(doomed)  # removes links inside as links: never follows them out of the root


def trash(root: Path) -> list[Path]:
    """Leftovers of removals that were interrupted (``.trash-*`` directories)."""
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir()) if p.name.startswith(_TRASH) and not p.is_symlink() and p.is_dir()]


def age_days(info: VenvInfo, now: float | None = None) -> float:
    """Days since the venv was last used."""
    return ((time.time() if now is None else now) - info.last_used) / 86400
