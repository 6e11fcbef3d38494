"""Find where this process may make cgroups; make, fill, read, empty and remove them.

Linux offers two layouts, often side by side (a *hybrid*):

- **cgroup v2**: one hierarchy (a ``cgroup2`` mount, ``/sys/fs/cgroup`` on current systems). A
  group gets the controllers its parent lists in ``cgroup.subtree_control``, and a parent may
  list domain controllers (memory) only while it holds no process of its own (the *no
  internal processes* rule; the root is exempt). The host's own cgroup holds the host, so
  worker groups go beside it, under its parent, where that is writable (a delegated subtree:
  ``systemd-run --user --scope -p Delegate=yes``, or everything as root), else under the
  host's cgroup itself, where they can still be made and emptied (``cgroup.kill``) but get
  no controller.
- **cgroup v1**: one hierarchy per controller or set of controllers (``/sys/fs/cgroup/memory``,
  ``/sys/fs/cgroup/cpu,cpuacct``, ...), with no such rule: worker groups go under the host's
  cgroup in each.

A controller lives in one of the two only. Groups are named ``pyisolate-<host pid>-<name>-<random>``,
so that the next host can sweep those of a host that died without removing them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyisolate.workers import tree

__all__ = ["Base", "Group", "Hierarchy", "bases", "group_name", "hierarchies", "sweep"]

logger = logging.getLogger(__name__)

#: The interface file that shows a controller is on in a group, by cgroup version.
_FILES = {
    2: {"memory": "memory.max", "cpu": "cpu.max", "pids": "pids.max"},
    1: {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us", "pids": "pids.max", "cpuacct": "cpuacct.usage"},
}
#: The controllers limits use.
_LIMITING = frozenset({"memory", "cpu", "pids"})
_STALE = re.compile(r"pyisolate-(\d+)-")
#: How long removing a group waits for the processes it killed in it to exit.
_KILL_TIMEOUT = 5.0
#: Kill passes over a v1 group before giving up on one whose members keep changing.
_MAX_PASSES = 64
#: How deep groups under a worker's own group are followed (a worker may make some in v2).
_MAX_DEPTH = 16


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy, and this process's cgroup in it.

    Attributes:
        version: 1 or 2.
        controllers: v1: the controllers the hierarchy carries (``name=...`` for named ones);
            v2: empty (each cgroup lists its own).
        mount: Where the hierarchy is mounted.
        current: This process's cgroup directory.
    """

    version: int
    controllers: frozenset[str]
    mount: Path
    current: Path


@dataclass(frozen=True)
class Base:
    """A cgroup under which this process may make groups, and the controllers they can get."""

    hierarchy: Hierarchy
    path: Path
    controllers: frozenset[str]


def hierarchies() -> list[Hierarchy]:
    """Return the cgroup hierarchies mounted here in which this process's cgroup is visible."""
    try:
        with open("/proc/self/cgroup") as f:
            own = f.read().splitlines()
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:  # not Linux, or no /proc
        return []
    found: list[Hierarchy] = []
    for line in own:
        number, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if not path.startswith("/") or path.endswith(" (deleted)"):
            continue
        version = 2 if number == "0" and not names else 1
        controllers = frozenset(names.split(",")) if version == 1 else frozenset()
        for fields in mounts:
            if "-" not in fields:
                continue
            dash = fields.index("-")
            if len(fields) < dash + 4 or dash < 5:
                continue
            kind, options = fields[dash + 1], set(fields[dash + 3].split(","))
            if (version == 2 and kind != "cgroup2") or (version == 1 and (kind != "cgroup" or controllers - options)):
                continue
            root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
            if root != "/" and path != root and not path.startswith(root + "/"):
                continue  # a bind mount of another part of the hierarchy
            relative = path[len(root):] if root != "/" else path
            found.append(Hierarchy(version, controllers, point, point / relative.lstrip("/")))
            break
    return found


def bases() -> tuple[list[Base], list[Base]]:
    """Return where this process may make groups (cgroup v2 first), and where it may not (not writable)."""
    usable: list[Base] = []
    closed: list[Base] = []
    for hierarchy in hierarchies():
        if hierarchy.version == 2:
            candidates = [hierarchy.current] if _is_root(hierarchy.current) else [
                # Beside the host's cgroup first: under the host's own, a group gets no controller.
                path for path in (hierarchy.current.parent, hierarchy.current)
                if path == hierarchy.mount or hierarchy.mount in path.parents
            ]
            best: Base | None = None
            for path in candidates:
                base = Base(hierarchy, path, _v2_controllers(path))
                if not _writable(path, procs=True):
                    closed.append(base)
                    continue
                if best is None or len(base.controllers & _LIMITING) > len(best.controllers & _LIMITING):
                    best = base
            if best is not None:
                usable.insert(0, best)
        elif hierarchy.controllers & {"memory", "cpu", "pids", "cpuacct"}:
            base = Base(hierarchy, hierarchy.current, hierarchy.controllers)
            (usable if _writable(hierarchy.current, procs=False) else closed).append(base)
    return usable, closed


def group_name(name: str) -> str:
    """Return a fresh group name for extension ``name``, carrying this host's pid."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]
    return f"pyisolate-{os.getpid()}-{safe}-{secrets.token_hex(4)}"


def sweep(base: Path, version: int) -> None:
    """Remove the groups that dead hosts left under ``base``, killing what still runs in them."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        match = _STALE.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        # A pid in use may be a new process, not the host: its groups wait for a later sweep.
        if pid == os.getpid() or _alive(pid):
            continue
        logger.info("removing cgroup %s: the host (pid %d) that made it is gone", entry.path, pid)
        Group(Path(entry.path), version).remove()


class Group:
    """A cgroup this process made: move processes in, write its limits, read it, remove it."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    @classmethod
    def make(cls, base: Base, name: str, enable: Iterable[str] = ()) -> Group:
        """Create group ``name`` under ``base``; in v2, first enable the ``enable`` controllers for it.

        A controller that cannot be enabled is left out (``has`` tells which are on).

        Raises:
            OSError: the directory could not be made.
        """
        if base.hierarchy.version == 2:
            on = set(_read(base.path / "cgroup.subtree_control").split())
            for controller in enable:
                if controller not in on:
                    try:
                        _write(base.path / "cgroup.subtree_control", f"+{controller}")
                    except OSError as exc:  # EBUSY (processes in base), EACCES, ENOENT (not offered)
                        logger.debug("cannot enable %s in %s: %s", controller, base.path, exc)
        path = base.path / name
        path.mkdir()
        return cls(path, base.hierarchy.version)

    def has(self, controller: str) -> bool:
        """Whether ``controller`` is on in this group."""
        file = _FILES[self.version].get(controller)
        return file is not None and (self.path / file).exists()

    def write(self, file: str, value: str) -> None:
        """Write ``value`` to the group's interface ``file`` (OSError if the kernel refuses it)."""
        _write(self.path / file, value)

    def read_key(self, file: str, key: str) -> int | None:
        """The number after ``key`` in the group's flat-keyed ``file``, or None."""
        for line in _read(self.path / file).splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
        return None

    def read_int(self, file: str) -> int | None:
        """The group's ``file`` as one number, or None."""
        text = _read(self.path / file).strip()
        return int(text) if text.isdigit() else None

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group.

        Raises:
            OSError: the kernel refused (the process is gone, or no permission).
        """
        self.write("cgroup.procs", str(pid))

    def remove(self) -> bool:
        """Kill whatever runs in the group or under it, then remove them all; True once gone."""
        if not self.path.exists():
            return True
        deadline = time.monotonic() + _KILL_TIMEOUT
        emptied = False
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            try:  # the kernel kills the whole subtree, forks racing with it included (Linux 5.14)
                self.write("cgroup.kill", "1")
                emptied = _wait_unpopulated(self.path, deadline)
            except OSError as exc:
                logger.debug("cgroup.kill of %s failed: %s", self.path, exc)
        if not emptied:
            _kill_members(self.path, deadline)
        return _rmdir_tree(self.path, 0)


def _kill_members(path: Path, deadline: float) -> bool:
    """SIGKILL every process in ``path`` and the groups under it, pass after pass, until none is left.

    Each pass kills what it lists, then waits for those to exit, so the next pass sees only
    processes forked since. A process is signalled through a pidfd opened before the group was
    listed again: a pid listed then whose pidfd's process is still alive is that process, so a
    recycled pid is never hit.
    """
    for _ in range(_MAX_PASSES):
        listed = _members(path, 0)
        if not listed:
            return True
        fds = {pid: fd for pid in listed if (fd := tree.open_pidfd(pid)) is not None}
        try:
            still = _members(path, 0)
            killed: list[int] = []
            for pid, fd in fds.items():
                if pid in still and not tree.exited(fd):
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        killed.append(fd)
                    except OSError:  # it exited just now, or EPERM (a setuid program)
                        pass
            if not tree.wait_exited(killed, max(0.0, deadline - time.monotonic())):
                logger.warning("processes in cgroup %s have not exited %.1f s after SIGKILL", path, _KILL_TIMEOUT)
                return False
        finally:
            tree.close_pidfds(fds.values())
        if not killed:  # those listed exited just now, or are not ours to kill (a setuid program)
            return not _members(path, 0)
    return False


def _members(path: Path, depth: int) -> set[int]:
    """Pids of the processes in group ``path`` and the groups under it."""
    pids = {int(p) for p in _read(path / "cgroup.procs").split() if p.isdigit()}
    if depth < _MAX_DEPTH:
        for sub in _subgroups(path):
            pids |= _members(sub, depth + 1)
    return pids


def _wait_unpopulated(path: Path, deadline: float) -> bool:
    """Wait until no process is left in v2 group ``path`` or under it (``cgroup.events``), up to ``deadline``."""
    try:
        fd = os.open(path / "cgroup.events", os.O_RDONLY)
    except OSError:
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)  # the kernel signals each change of the file
        while b"populated 0" not in os.pread(fd, 4096, 0):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)
        return True
    finally:
        os.close(fd)


def _rmdir_tree(path: Path, depth: int) -> bool:
    """Remove group ``path``, the groups under it first; True once it is gone."""
    if depth < _MAX_DEPTH:
        for sub in _subgroups(path):
            _rmdir_tree(sub, depth + 1)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot remove cgroup %s: %s (a later host sweeps it)", path, exc)
        return False
    return True


def _subgroups(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _v2_controllers(path: Path) -> frozenset[str]:
    """Controllers a new group under v2 cgroup ``path`` has, or can be given."""
    on = set(_read(path / "cgroup.subtree_control").split())
    # Enabling more is allowed only where no process lives (the root is exempt), and we never
    # move the host's own processes around to make it so.
    if os.access(path / "cgroup.subtree_control", os.W_OK) and (_is_root(path) or not _read(path / "cgroup.procs")):
        on |= set(_read(path / "cgroup.controllers").split())
    return frozenset(on)


def _is_root(path: Path) -> bool:
    """Whether v2 cgroup ``path`` is its hierarchy's root (which alone lacks ``cgroup.type``)."""
    return path.is_dir() and not (path / "cgroup.type").exists()


def _writable(path: Path, *, procs: bool) -> bool:
    """Whether this process may make groups under ``path`` (and, with ``procs``, move processes there from it)."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    # Moving a process between two v2 groups takes write access to their common ancestor's cgroup.procs.
    return not procs or os.access(path / "cgroup.procs", os.W_OK)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(path: Path) -> str:
    """The text of a cgroup file, or "" where it is missing or unreadable."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    # One write(2) per value: cgroup files take a value per write, and buffering could split one.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _unescape(text: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
