"""Sealed memfds: the only kind of file a segment may be, checked before anything is mapped.

A segment is an anonymous file of the kernel's internal shmem mount (``memfd_create``), with
its whole size reserved (``posix_fallocate``) and sealed against shrinking and growing
(``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``). The seals hold against every holder, the
creator included, whatever the path or descriptor it uses: no peer can pull pages from under
a mapping, which is what made a truncated file kill its readers with SIGBUS. /dev/shm's size
plays no part, and nothing is left in a file system when a process dies.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import stat
import threading

__all__ = ["NoRoom", "RefusedHandle", "check", "create", "held", "hold", "let_go", "warn_copy"]

logger = logging.getLogger("pyisolate.shm")

#: The seals every segment carries before anyone maps it.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: Shown in /proc/<pid>/fd links. Never the segment's id: that is the capability.
_NAME = "pyisolate"
#: Reservation failures that mean "no room here", not a bug: the value travels as a copy.
_NO_ROOM = {errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EMFILE, errno.ENFILE, errno.EPERM,
            errno.EACCES, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
#: MFD_NOEXEC_SEAL (Linux 6.3): where vm.memfd_noexec=2, memfds without it are refused.
_NOEXEC_SEAL = 0x0008
#: memfd_create flags: with MFD_NOEXEC_SEAL until a kernel refuses it as unknown (EINVAL).
_flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | _NOEXEC_SEAL


class RefusedHandle(ValueError):
    """A received handle names a segment the sender may not share, or one that is not safe to map."""


class NoRoom(OSError):
    """This process cannot reserve a segment (memory, file-size or descriptor limits)."""

    def __init__(self, size: int, cause: OSError) -> None:
        super().__init__(cause.errno, f"cannot reserve {size} bytes of shared memory: {cause.strerror}")
        self.size = size
        self.reason = cause.strerror or str(cause)

    @property
    def fix(self) -> str:
        """What the user can change so that values are shared again, in words."""
        if self.errno == errno.EFBIG:
            return "raise this process's file-size limit (ulimit -f unlimited; RLIMIT_FSIZE)"
        if self.errno in (errno.EMFILE, errno.ENFILE):
            return "raise the open-file limit (ulimit -n) or keep fewer shared tensors alive"
        if self.errno in (errno.ENOSPC, errno.ENOMEM):
            return ("free memory, or raise the memory limit of the container or cgroup "
                    "(docker run --memory ...; memory.max)")
        return "this kernel cannot seal memfds (Linux 3.17 or later is needed)"


_memfd_dev: int | None = None


def _shmem_device() -> int:
    """The device number of the kernel's internal shmem mount, where every memfd lives."""
    global _memfd_dev
    if _memfd_dev is None:
        fd = _memfd_create()
        try:
            _memfd_dev = os.fstat(fd).st_dev
        finally:
            os.close(fd)
    return _memfd_dev


def _memfd_create() -> int:
    global _flags
    try:
        return os.memfd_create(_NAME, _flags)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not _flags & _NOEXEC_SEAL:
            raise
        _flags &= ~_NOEXEC_SEAL  # a kernel before 6.3
        return os.memfd_create(_NAME, _flags)


def create(size: int) -> int:
    """A new sealed memfd of ``size`` bytes, all reserved; the caller owns the descriptor.

    Raises:
        NoRoom: the space or the descriptor cannot be had (the caller sends a copy instead).
    """
    try:
        fd = _memfd_create()
    except OSError as exc:
        raise NoRoom(size, exc) from None
    try:
        os.ftruncate(fd, size)
        # Reserve every page now: a sparse file faults on first write where memory is short.
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_ROOM:
            raise NoRoom(size, exc) from None
        raise
    return fd


def check(fd: int, needed: int) -> os.stat_result:
    """Check that ``fd`` is a sealed, fully reserved memfd of at least ``needed`` bytes.

    Raises:
        RefusedHandle: anything else (a regular file, a pipe, an unsealed or hugetlb memfd,
            one too small or with unreserved pages).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_dev != _shmem_device():
        raise RefusedHandle("the descriptor is not a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise RefusedHandle("the descriptor is not a memfd") from None
    if seals & SEALS != SEALS:
        raise RefusedHandle("the memfd is not sealed against shrinking and growing")
    if needed < 0 or st.st_size < needed:
        raise RefusedHandle(f"the segment holds {st.st_size} bytes, the handle needs {needed}")
    if st.st_blocks * 512 < st.st_size:
        raise RefusedHandle("the segment's memory is not reserved")
    return st


# Descriptors kept open by shared memory in this process: one per live mapping, and in the host
# those the workers PUT. They may use half of the open-file limit; the other half stays for
# sockets, pipes and the application (libzmq aborts the process on EMFILE).
_held = 0
_budget = 0
_held_lock = threading.Lock()


def hold() -> bool:
    """Count one more descriptor kept by shared memory; False (nothing counted) past the budget."""
    global _held
    with _held_lock:
        if _held >= _budget and not _raise_budget():
            return False
        _held += 1
        return True


def let_go() -> None:
    """One descriptor counted by ``hold`` was closed."""
    global _held
    with _held_lock:
        _held -= 1


def held() -> int:
    """Descriptors shared memory keeps open in this process."""
    return _held


def _raise_budget() -> bool:
    """Recompute the budget, raising the soft open-file limit (up to the hard one) if need be."""
    global _budget
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and _held >= soft // 2 and soft != hard:
        raised = soft * 2 if hard == resource.RLIM_INFINITY else min(hard, soft * 2)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            logger.info("raised this process's open-file limit from %d to %d for shared memory", soft, raised)
            soft = raised
        except (OSError, ValueError):
            pass
    _budget = (1 << 30) if soft == resource.RLIM_INFINITY else soft // 2
    return _held < _budget


_warned = False


def warn_copy(exc: NoRoom, what: str) -> None:
    """Say once per process that values travel as copies because shared memory has no room."""
    global _warned
    if _warned:
        return
    _warned = True
    logger.warning(
        "shared memory cannot hold a %s of %d bytes (%s), so it travels as a copy through the "
        "socket; so will any other value that does not fit (this warning is shown once). Fix: %s",
        what, exc.size, exc.reason, exc.fix,
    )
