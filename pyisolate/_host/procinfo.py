"""Memory and CPU time of a worker process, as the host can read them from /proc.

Workers are non-dumpable (see ``process.bootstrap``), which makes most of ``/proc/<pid>``
root's: ``stat`` and ``status`` stay world-readable (CPU time, RSS), while ``smaps_rollup``
(PSS) needs ptrace access to the process, which another process of the same user is denied
for a non-dumpable one. So PSS is read where the host may (a root host, or CAP_SYS_PTRACE)
and is None elsewhere; RSS and CPU time are always there on Linux.
"""

from __future__ import annotations

import os

from pyisolate.workers.tree import stat_fields

__all__ = ["process_info"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_info(pid: int) -> dict[str, float | int | None]:
    """``rss`` and ``pss`` (bytes; pss None where unreadable) and ``cpu_seconds`` (user + system)
    of process ``pid``; all None if it is gone or /proc cannot tell."""
    info: dict[str, float | int | None] = {"rss": None, "pss": None, "cpu_seconds": None}
    fields = stat_fields(pid)
    if fields is None:
        return info
    try:
        info["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
        info["rss"] = int(fields[21]) * _PAGE
    except (IndexError, ValueError):
        return info
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    info["pss"] = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass  # not ours to read (non-dumpable, no CAP_SYS_PTRACE), or gone meanwhile
    return info
