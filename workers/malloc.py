"""glibc's malloc, told to give large freed buffers back to the system (workers only).

glibc serves a large allocation with its own mmap and unmaps it when freed, but only above a
threshold that it raises, up to 32 MiB, each time such a block is freed: after the first
fresh 12 MiB image tensor is freed, every later one is carved from the heaps of the threads
that make them, and freed memory stays in the process (measured: +110 MB per worker over 300
workflows). Setting the threshold fixes it (``mallopt(M_MMAP_THRESHOLD)`` turns the dynamic
raise off), so buffers of ``MMAP_THRESHOLD`` bytes or more go back when freed.

A user's own ``MALLOC_*`` settings (or ``GLIBC_TUNABLES`` naming malloc) reach the worker,
which the host passes through, and win: then this does nothing. Without glibc (musl) neither.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD", "tune", "tuned"]

#: Allocations of this many bytes or more are mmapped, and unmapped when freed.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3
#: Settings of the user's that say how malloc should hold memory: ours would override them.
_USERS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
#: Whether ``tune`` set the threshold in this process.
tuned = False


def tune() -> bool:
    """Fix glibc's mmap threshold unless the user set malloc up; True if it was set here."""
    global tuned
    if any(name in os.environ for name in _USERS) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return tuned
