"""Per-worker resource limits: memory, CPU, tasks and open files, through cgroups and rlimits.

The user asks per extension (and the manager caps them all)::

    limits={"memory": "4GiB", "cpu": 1.5, "processes": 64, "open_files": 1024}

``Limits.parse`` checks that and ``Limits.within`` applies the manager's ceiling (``Limits`` is
defined in ``pyisolate._limits``, which holds only values and needs nothing of this machine). Then, for
each worker, one ``Enforcement``, owned by the worker's process object:

1. ``Enforcement.create(name, limits, required=...)`` before the worker starts: it makes the
   worker's cgroups and writes their limits;
2. the worker is spawned, and ``rlimits()`` handed to it: its bootstrap calls ``setrlimit`` on
   itself (a ``preexec_fn`` is unsafe in a host that runs threads);
3. ``attach(pid)`` right after the spawn, before the worker is sent its boot message, so no
   extension code ever runs outside the cgroups;
4. ``close()`` once the worker is gone: what is left in its cgroups is killed, and they are removed.

Where each limit is enforced (``mechanisms()`` tells for this machine):

=============  ==========================  =====================================================
limit          cgroup (v2 or v1)           without a writable cgroup
=============  ==========================  =====================================================
memory         memory.max, no swap         RLIMIT_DATA, per process: heap and anonymous mappings
                                           only (not RLIMIT_AS, which breaks CUDA's large virtual
                                           reservations); a big allocation raises MemoryError
cpu            cpu.max (quota per 100 ms)  not enforced
processes      pids.max: processes and     RLIMIT_NPROC: counts every task of the user, so it is
               threads of the whole tree   set to the user's tasks now plus the limit (approximate),
                                           and root ignores it
open_files     RLIMIT_NOFILE, per process  the same
=============  ==========================  =====================================================

With ``required=True`` a limit that would be enforced only approximately (the right-hand
column) or not at all makes ``create`` fail, naming the fix.

What limits do not do: the worker runs as the host's user, so it can write its own cgroup's
files (raise its limits) or move itself out of the group, and a root worker can raise its
rlimits. Against an extension written to escape, limits hold only together with a sandbox
that hides or write-protects ``/sys/fs/cgroup``. Memory the worker used before ``attach``
(its first milliseconds) stays charged to the host's cgroup.
"""

from __future__ import annotations

import logging
import os
import resource
import warnings
from pathlib import Path
from types import TracebackType

from ...errors import ConfigError
from . import _cgroups
from ..._limits import Limits

__all__ = ["Enforcement", "Limits", "mechanisms"]

logger = logging.getLogger(__name__)

#: The cgroup controller of each limit that has one.
_CONTROLLERS = {"memory": "memory", "cpu": "cpu", "processes": "pids"}
#: cgroup CPU bandwidth: quota per period. The kernel takes quotas of 1 ms and more.
_CPU_PERIOD_US = 100_000
_RLIMIT_DATA = "rlimit (RLIMIT_DATA: heap only)"
_RLIMIT_NPROC = "rlimit (RLIMIT_NPROC: per user)"
_FIX = (
    "fix: run the host where it may make cgroups: under `systemd-run --user --scope -p Delegate=yes <command>` "
    "(a cgroup v2 subtree of its own) or as root"
)


def mechanisms() -> dict[str, str | None]:
    """Say which mechanism would enforce each limit here, or None where none can.

    Looks without changing anything (``Enforcement.create`` may still find less, where the
    kernel refuses what the files' permissions allow).

    Returns:
        ``{"memory": "cgroup v2" | "cgroup v1" | "rlimit (RLIMIT_DATA: heap only)" | None,
        "cpu": "cgroup v2" | "cgroup v1" | None, "processes": "cgroup v2" | "cgroup v1" |
        "rlimit (RLIMIT_NPROC: per user)" | None, "open_files": "rlimit", "why": text | None}``,
        where ``why`` says what falls short of a cgroup, and the fix.
    """
    usable, closed = _cgroups.bases()
    found: dict[str, str | None] = {}
    short: list[str] = []
    for name, controller in _CONTROLLERS.items():
        base = next((b for b in usable if controller in b.controllers), None)
        if base is not None:
            found[name] = f"cgroup v{base.hierarchy.version}"
            continue
        found[name] = _fallback(name)
        instead = f", so {found[name]}" if found[name] else ""
        short.append(f"{name}: {_no_cgroup(controller, usable, closed)}{instead}")
    found["open_files"] = "rlimit"
    found["why"] = "; ".join(short) + f"; {_FIX}" if short else None
    return found


class Enforcement:
    """One worker's limits: its cgroups, and the rlimits it sets on itself.

    Created before the worker runs and closed, its cgroups removed, after the worker is gone;
    one owner (the worker's process object). A context manager; ``close()`` is idempotent.

    Attributes:
        enforced: How each enforced limit is, e.g. ``"memory: cgroup v1"``.
        missing: Each limit that is not enforced, with why and the fix.
    """

    def __init__(self, name: str, limits: Limits) -> None:
        """Hold nothing yet; ``create`` is the way to make one."""
        self.name = name
        self.limits = limits
        self.enforced: list[str] = []
        self.missing: list[str] = []
        self._groups: list[_cgroups.Group] = []
        self._tracking: _cgroups.Group | None = None  # the v2 group, holding the whole tree
        self._memory: _cgroups.Group | None = None
        self._cpuacct: _cgroups.Group | None = None  # v1 CPU accounting, where there is no v2 group
        self._rlimits: dict[int, int] = {}
        self._oom = False
        self._cpu_seconds: float | None = None
        self._closed = False
        self._group_name = _cgroups.group_name(name)  # the same in every hierarchy

    @classmethod
    def create(cls, name: str, limits: Limits, *, required: bool) -> Enforcement:
        """Make extension ``name``'s cgroups and write ``limits`` there, or plan rlimits instead.

        Also removes the groups that dead hosts left behind. A limit that cannot be enforced
        here is listed in ``missing``, or, with ``required``, refused.

        Raises:
            ConfigError: ``required`` and a limit can be enforced only approximately or not at
                all; the message says which, why, and the fix.
        """
        self = cls(name, limits)
        try:
            refused = self._set_up()
            if required and refused:
                raise ConfigError(
                    f"cannot enforce the limits of extension {name!r} here, and they are required: "
                    f"{'; '.join(refused)}. {_FIX[0].upper()}{_FIX[1:]}; or accept what can be enforced "
                    "(required=False)"
                )
        except BaseException:
            self.close()
            raise
        return self  # what is missing, the caller says (once per host, not once per worker)

    @property
    def cgroups(self) -> tuple[Path, ...]:
        """The cgroup directories made for this worker (until ``close``)."""
        return tuple(group.path for group in self._groups)

    def rlimits(self) -> dict[int, tuple[int, int]]:
        """Return what the worker must ``setrlimit`` on itself: ``{RLIMIT_...: (soft, hard)}``.

        Soft and hard are the same, so the worker cannot raise them again (unless it is root).
        Call it just before the spawn: the RLIMIT_NPROC fallback counts the user's tasks now.
        """
        wanted = dict(self._rlimits)
        if resource.RLIMIT_NPROC in wanted:  # a per-user count: the tasks the user has already are not the worker's
            wanted[resource.RLIMIT_NPROC] += _user_tasks()
        limits: dict[int, tuple[int, int]] = {}
        for which, value in wanted.items():
            hard = resource.getrlimit(which)[1]
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)  # inherited: the worker could not raise it anyway
            limits[which] = (value, value)
        return limits

    def attach(self, pid: int) -> None:
        """Move process ``pid`` into this worker's cgroups; call before it runs extension code.

        Raises:
            OSError: the kernel refused (the process is gone, or no permission).
        """
        for group in self._groups:
            try:
                group.attach(pid)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot move process {pid} into cgroup {group.path}: {exc.strerror}") from exc

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of this worker for its memory limit."""
        if not self._oom and self._memory is not None:
            file = "memory.events" if self._memory.version == 2 else "memory.oom_control"
            self._oom = bool(self._memory.read_key(file, "oom_kill"))
        return self._oom

    def cpu_seconds(self) -> float | None:
        """CPU time the worker's tree has used, in seconds; None where no cgroup counts it."""
        if self._closed:
            return self._cpu_seconds
        if self._tracking is not None:
            usec = self._tracking.read_key("cpu.stat", "usage_usec")
            return None if usec is None else usec / 1e6
        if self._cpuacct is not None:
            nsec = self._cpuacct.read_int("cpuacct.usage")
            return None if nsec is None else nsec / 1e9
        return None

    def close(self) -> None:
        """Kill whatever is left in the worker's cgroups and remove them; idempotent.

        Blocks until the processes it killed have exited: at once, unless one is in
        uninterruptible sleep (then at most 5 s, and the group is left for a later host's sweep).
        """
        if self._closed:
            return
        self.oom_killed()  # read before the counters go with the groups
        self._cpu_seconds = self.cpu_seconds()
        self._closed = True
        # The tracking group first: in v2, cgroup.kill ends the whole tree at once.
        for group in sorted(self._groups, key=lambda g: g is not self._tracking):
            group.remove()
        self._groups.clear()

    def __enter__(self) -> Enforcement:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(
            f"limits of extension {self.name!r} were never closed", ResourceWarning, stacklevel=2, source=self
        )
        try:
            self.close()
        except Exception:  # an interpreter shutting down; the next host sweeps the groups
            pass

    def __repr__(self) -> str:
        return f"<Enforcement {self.name!r}: {self.limits.describe()}{' (closed)' if self._closed else ''}>"

    def _set_up(self) -> list[str]:
        """Make the cgroups and plan the rlimits; return what falls short of the limits asked for."""
        limits = self.limits
        wanted = {name: c for name, c in _CONTROLLERS.items() if getattr(limits, name) is not None}
        by: dict[str, str] = {}  # limit -> "cgroup v2" / "cgroup v1"
        failed: dict[str, str] = {}  # limit -> why the cgroup meant for it did not take it
        usable, closed = _cgroups.bases() if wanted else ([], [])
        for base in usable:
            todo = {name: c for name, c in wanted.items() if name not in by and c in base.controllers}
            # The v2 group is made whenever a cgroup limit is asked for, even with no controller:
            # it holds the worker's whole tree, counts its CPU time and kills it at once.
            if not todo and base.hierarchy.version != 2:
                continue
            group = self._make(base, todo, failed)
            if group is None:
                continue
            for name, controller in todo.items():
                if not group.has(controller):
                    failed[name] = f"cgroup v{group.version} {group.path} did not get the {controller} controller"
                    continue
                try:
                    self._write(group, name)
                except OSError as exc:
                    failed[name] = f"cgroup v{group.version} {group.path} refused it ({exc.strerror})"
                    continue
                by[name] = f"cgroup v{group.version}"
                failed.pop(name, None)
                if name == "memory":
                    self._memory = group
        if self._tracking is None and self._groups and self._cpuacct is None:
            # cgroup v1 only: CPU time is counted by cpuacct, which may be a hierarchy of its own.
            accounting = next((b for b in usable if "cpuacct" in b.controllers), None)
            if accounting is not None:
                self._make(accounting, {}, failed)
        refused: list[str] = []
        for name, controller in wanted.items():
            if name in by:
                self.enforced.append(f"{name}: {by[name]}")
                continue
            why = failed.get(name) or _no_cgroup(controller, usable, closed)
            fallback = _fallback(name)
            refused.append(f"{name}: {why}" + (f"; only {fallback} is possible" if fallback else ""))
            if fallback is None:
                self.missing.append(f"{name}: {why}; {_FIX}")
                continue
            self.enforced.append(f"{name}: {fallback}")
            which = resource.RLIMIT_DATA if name == "memory" else resource.RLIMIT_NPROC
            self._rlimits[which] = getattr(limits, name)
        if limits.open_files is not None:
            self.enforced.append("open_files: rlimit")
            self._rlimits[resource.RLIMIT_NOFILE] = limits.open_files
        return refused

    def _make(self, base: _cgroups.Base, todo: dict[str, str], failed: dict[str, str]) -> _cgroups.Group | None:
        """Make this worker's group under ``base``, controllers ``todo`` on; first sweep dead hosts' groups there."""
        _cgroups.sweep(base.path, base.hierarchy.version)
        try:
            group = _cgroups.Group.make(base, self._group_name, todo.values())
        except OSError as exc:
            for name in todo:
                failed[name] = f"cannot make a cgroup under {base.path} ({exc.strerror})"
            logger.debug("cannot make a cgroup under %s: %s", base.path, exc)
            return None
        self._groups.append(group)
        if group.version == 2:
            self._tracking = group
        elif group.has("cpuacct"):
            self._cpuacct = group
        return group

    def _write(self, group: _cgroups.Group, name: str) -> None:
        """Write limit ``name`` into ``group``."""
        limits, v2 = self.limits, group.version == 2
        if name == "memory":
            assert limits.memory is not None
            group.write("memory.max" if v2 else "memory.limit_in_bytes", str(limits.memory))
            # Without swap the limit is real: else the excess is swapped out, not refused.
            swap = "memory.swap.max" if v2 else "memory.memsw.limit_in_bytes"  # v1: memory + swap
            if (group.path / swap).exists():
                group.write(swap, "0" if v2 else str(limits.memory))
        elif name == "cpu":
            assert limits.cpu is not None
            quota = max(1000, round(limits.cpu * _CPU_PERIOD_US))
            if v2:
                group.write("cpu.max", f"{quota} {_CPU_PERIOD_US}")
            else:
                group.write("cpu.cfs_period_us", str(_CPU_PERIOD_US))
                group.write("cpu.cfs_quota_us", str(quota))
        else:
            group.write("pids.max", str(limits.processes))


def _fallback(name: str) -> str | None:
    """The rlimit that stands in for limit ``name``'s cgroup controller, or None."""
    if name == "memory":
        return _RLIMIT_DATA
    if name == "processes" and not _ignores_nproc():
        return _RLIMIT_NPROC
    return None


def _no_cgroup(controller: str, usable: list[_cgroups.Base], closed: list[_cgroups.Base]) -> str:
    """Why no cgroup here takes ``controller``."""
    shut = sorted({str(b.path) for b in closed if b.hierarchy.version == 2 or controller in b.controllers})
    parts = [f"not writable by uid {os.geteuid()}: {', '.join(shut)}"] if shut else []
    parts += [f"cgroup v2 {b.path} does not offer it" for b in usable if b.hierarchy.version == 2]
    if controller == "pids" and _ignores_nproc():
        parts.append("and RLIMIT_NPROC does not bind root")
    return f"no writable cgroup has the {controller} controller here" + (f" ({'; '.join(parts)})" if parts else "")


def _ignores_nproc() -> bool:
    """Whether the kernel lets this process's user ignore RLIMIT_NPROC (root, CAP_SYS_RESOURCE or CAP_SYS_ADMIN)."""
    if os.getuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            caps = next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")), 0)
    except (OSError, ValueError):
        return False
    return bool(caps & (1 << 21 | 1 << 24))  # CAP_SYS_ADMIN, CAP_SYS_RESOURCE


def _user_tasks() -> int:
    """Tasks (threads) of this real uid now: what RLIMIT_NPROC counts."""
    uid, count = os.getuid(), 0
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # gone since the listing
            continue
        if int(status.get("Uid", "-1").split()[0]) == uid:
            count += int(status.get("Threads", "1"))
    return count

