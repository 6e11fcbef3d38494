"""A worker's process tree: keep its descendants under it, and kill them all.

Three tools, each covering what the others cannot (Linux; elsewhere they do nothing):

- The worker is a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): a descendant whose
  parent exits (a double-forked daemon) is re-parented to the worker, not to init, so it
  stays in the worker's tree however it left the worker's session.
- ``kill_descendants(pid)`` walks ``/proc/<pid>/task/*/children`` and SIGKILLs every
  descendant, pass after pass until one finds no process it had not seen (a killed parent's
  children move up to the subreaper, where the next pass finds them). Each process is
  signalled through a pidfd opened *before* it is checked to be the child it was listed as,
  so a pid reused in between is never hit.
- The worker leads its own process group (the host starts it with ``setsid``), and
  ``kill_group`` SIGKILLs what is left of that group once the worker is gone: descendants of
  a worker that could not clean up (SIGKILLed by someone else, ``os._exit``) that did not
  leave its group.

The worker runs ``kill_descendants(os.getpid())`` on every way out (``workers.exits``); the
host runs it with the worker's pidfd before it SIGKILLs a worker, and ``kill_group`` after
every worker's exit (``pyisolate._host.process``).
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Iterable

__all__ = [
    "become_subreaper",
    "close_pidfds",
    "exited",
    "kill_descendants",
    "kill_group",
    "open_pidfd",
    "parent_of",
    "stat_fields",
    "wait_exited",
]

_PR_SET_CHILD_SUBREAPER = 36
#: pidfd_send_signal(2) flag (Linux 6.9): signal the process group the pidfd's process leads.
_PIDFD_SIGNAL_PROCESS_GROUP = 4
#: Passes of kill_descendants before it gives up on a tree that keeps changing under it.
_MAX_PASSES = 64
#: What _kill_child says of a process that is alive but no longer the listed parent's child.
_MOVED = -1


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (not init's); True if it worked."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # not Linux, or no prctl in this libc
        return False


def open_pidfd(pid: int) -> int | None:
    """A pidfd of process ``pid``, or None if it is gone or pidfds are unavailable."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited (a pidfd turns readable when it does)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def kill_descendants(pid: int, pidfd: int | None = None) -> list[int]:
    """SIGKILL every descendant of process ``pid``; return pidfds of those signalled.

    ``pidfd``, a pidfd of ``pid``, is needed where ``pid`` is not this process: what is
    listed under a process found exited after the listing is ignored (its pid may name
    another process by then; its real children have moved up, where a later pass finds
    them). The caller waits on the returned pidfds if it must (``wait_exited``) and closes
    them (``close_pidfds``).
    """
    seen: dict[int, int | None] = {}  # pid -> the pidfd it was signalled through; None: exited
    try:
        for _ in range(_MAX_PASSES):
            again = False
            queue: list[tuple[int, int | None]] = [(pid, pidfd)]
            while queue:
                parent, parent_fd = queue.pop()
                kids = _children(parent)
                if parent_fd is not None and exited(parent_fd):
                    continue
                for kid in kids:
                    if kid not in seen:
                        again = True  # something new: walk once more after this pass
                        fd = _kill_child(kid, parent)
                        if fd == _MOVED:
                            continue  # its parent just exited: the next pass finds it where it went
                        seen[kid] = fd
                    fd = seen[kid]
                    if fd is not None:
                        queue.append((kid, fd))
            if not again:
                break
    except BaseException:
        close_pidfds(fd for fd in seen.values() if fd is not None)
        raise
    return [fd for fd in seen.values() if fd is not None]


def kill_group(pidfd: int | None, pgid: int) -> None:
    """SIGKILL what is left of process group ``pgid``, led by the process of ``pidfd``.

    Through the pidfd (Linux 6.9+) the group is the one that process led, even once its pid
    is free for reuse; without it, ``killpg(pgid)`` could reach a new group whose leader got
    that pid since the leader was reaped (pids wrap around rarely, and this runs at once).
    """
    if pidfd is not None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL, None, _PIDFD_SIGNAL_PROCESS_GROUP)
            return
        except ProcessLookupError:
            return  # the group is empty
        except OSError:
            pass  # EINVAL: a kernel without the flag
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def wait_exited(pidfds: Iterable[int], timeout: float) -> bool:
    """Block until every process behind ``pidfds`` has exited, at most ``timeout`` s; True if all did."""
    poller = select.poll()
    left = set(pidfds)
    for fd in left:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for fd, _ in poller.poll(remaining * 1000):
            poller.unregister(fd)
            left.discard(fd)
    return True


def close_pidfds(pidfds: Iterable[int]) -> None:
    """Close pidfds (those kill_descendants returned)."""
    for fd in pidfds:
        try:
            os.close(fd)
        except OSError:
            pass


def _children(pid: int) -> list[int]:
    """Children of ``pid``: each thread lists those it started."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids += map(int, f.read().split())
        except OSError:  # the thread ended, or a kernel without CONFIG_PROC_CHILDREN
            pass
    return kids


def _kill_child(pid: int, parent: int) -> int | None:
    """SIGKILL ``pid`` if it is alive and a child of ``parent``: its pidfd, None (it has
    exited) or _MOVED (alive, but not ``parent``'s child any more)."""
    fd = open_pidfd(pid)
    if fd is None:
        return None
    # The parent is read after the pidfd is opened, and the pidfd's process is seen alive
    # after the read: so the pid was that process's all along, and the parent is its own.
    now = parent_of(pid)
    if exited(fd):
        os.close(fd)
        return None
    if now != parent:
        os.close(fd)
        return _MOVED
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:  # it exited just now; or EPERM (a setuid program): its children may still be ours
        pass
    return fd


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` from ``state`` on (field 3 is index 0), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
    return stat[stat.rfind(b")") + 1:].split()


def parent_of(pid: int) -> int | None:
    """The parent of process ``pid`` in this process's numbering, or None if it is gone."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None
