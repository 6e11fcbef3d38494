"""Shared-memory segments for tensors and arrays: files in /dev/shm, one name per holder.

A segment is a file ``/dev/shm/psi-<session>-<actor>-<n>`` mapped with mmap. The process
that creates it names it after itself. A receiver checks the name against the true sender
(the broker stamps it), checks the size with fstat before mapping anything, maps the file
and gives it a name of its own (a hard link): from then on every holder owns one name, and
unlinks it when its mapping dies. The memory lives while any holder maps it.

Lifetime by acknowledgement: a sender pins the mapping of every segment it sends until the
receiver acknowledges (ACK, once it holds its own name) or goes away, so a sender that drops
its tensor right after sending cannot pull the memory from under the receiver.
"""

from __future__ import annotations

import atexit
import itertools
import mmap
import os
import re
import threading
import weakref
from dataclasses import dataclass

__all__ = ["Segment", "configure", "create", "receive", "sweep"]

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"psi-([0-9]+x[0-9a-f]+)-([A-Za-z0-9_.-]+)-([0-9]+)")

_session = ""
_actor = ""
_counter = itertools.count(1)
# Re-entrant: dropping a pin can free a mapping, whose finalizer takes the lock again.
_lock = threading.RLock()


@dataclass(eq=False)
class Segment:
    """One mapping of a shared file, held by this process under ``name``."""

    name: str
    size: int
    inode: tuple[int, int]
    mm: mmap.mmap


# Our live mappings, held weakly (tensors and arrays keep them alive): by inode (to reuse a
# mapping) and by address (to recognise memory that is already shared). Entries leave with
# their mapping, whose finalizer also unlinks our name.
_Entry = tuple[str, int, tuple[int, int], "weakref.ref[mmap.mmap]"]
_by_inode: dict[tuple[int, int], _Entry] = {}
_by_address: dict[int, _Entry] = {}
# Sender's name -> our mapping of that segment, so a segment received again costs no syscalls.
# Safe against a sender that replaces its file: we keep mapping our own link, of known size.
_by_sender_name: dict[str, _Entry] = {}
_sender_names: dict[str, set[str]] = {}  # our name -> the senders' names it is known by
@dataclass(eq=False)
class _Pin:
    segment: Segment
    count: int = 0


# Mappings pinned for receivers that have not acknowledged yet: peer -> name -> pin.
_pins: dict[bytes, dict[str, _Pin]] = {}


def configure(session: str, actor: str) -> None:
    """Name the segments this process creates (each worker calls this once)."""
    global _session, _actor
    _session, _actor = session, actor


def configure_host() -> str:
    """Start this host's session once: sweep dead sessions, unlink our names at exit."""
    if not _session:
        sweep_dead_sessions()
        configure(f"{os.getpid()}x{os.urandom(4).hex()}", "host")
        atexit.register(sweep)
    return _session


def session() -> str:
    """The session of this host and its workers ('' before configure)."""
    return _session


def _new_name() -> str:
    if not _session:
        raise RuntimeError("shared memory is not configured in this process")
    return f"psi-{_session}-{_actor}-{next(_counter)}"


def _register(name: str, fd: int, size: int) -> Segment:
    mm = mmap.mmap(fd, size)
    stat = os.fstat(fd)
    segment = Segment(name, size, (stat.st_dev, stat.st_ino), mm)
    address = _address(mm)
    entry: _Entry = (name, size, segment.inode, weakref.ref(mm))
    with _lock:
        _by_inode[segment.inode] = entry
        _by_address[address] = entry
    weakref.finalize(mm, _forget, name, segment.inode, address)
    return segment


def _live(entry: _Entry | None) -> Segment | None:
    if entry is None:
        return None
    mm = entry[3]()
    if mm is None or mm.closed:
        return None
    return Segment(entry[0], entry[1], entry[2], mm)


def _address(mm: mmap.mmap) -> int:
    import ctypes

    view = (ctypes.c_char * 1).from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _forget(name: str, inode: tuple[int, int], address: int) -> None:
    with _lock:
        if (entry := _by_inode.get(inode)) is not None and entry[0] == name:
            del _by_inode[inode]
        if (entry := _by_address.get(address)) is not None and entry[0] == name:
            del _by_address[address]
        for sender_name in _sender_names.pop(name, ()):
            if (entry := _by_sender_name.get(sender_name)) is not None and entry[0] == name:
                del _by_sender_name[sender_name]
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def create(size: int) -> Segment:
    """A new zero-filled segment of ``size`` bytes, named after this process."""
    name = _new_name()
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return _register(name, fd, size)
    except BaseException:
        os.unlink(os.path.join(SHM_DIR, name))
        raise
    finally:
        os.close(fd)


def find(address: int) -> Segment | None:
    """The segment whose mapping starts at ``address``, if it is one of ours."""
    return _live(_by_address.get(address))


def _remember(sender_name: str, entry: _Entry) -> None:
    _by_sender_name[sender_name] = entry
    _sender_names.setdefault(entry[0], set()).add(sender_name)


class RefusedHandle(ValueError):
    """A received handle names a segment the sender may not share, or lies about its size."""


def receive(name: object, sender: str, needed: int, sender_in_host: bool = False) -> Segment:
    """Map a segment named in a message from ``sender``, after checking it; hold our own name.

    ``sender_in_host``: the sender is an actor of the host process, whose segments are all
    named ``host``.

    Raises:
        RefusedHandle: not the sender's segment, not of this session, or smaller than ``needed``.
    """
    if not isinstance(name, str) or not (match := _NAME_RE.fullmatch(name)):
        raise RefusedHandle(f"malformed shared-memory name {name!r}")
    if match.group(1) != _session:
        raise RefusedHandle(f"segment {name!r} belongs to another session")
    owner = match.group(2)
    if owner != sender and not (owner == "host" and sender_in_host):
        raise RefusedHandle(f"segment {name!r} was not shared by {sender!r}")
    with _lock:
        known = _live(_by_sender_name.get(name))
    if known is not None and needed <= known.size:
        return known
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise RefusedHandle(f"segment {name!r} cannot be opened: {exc.strerror}") from None
    try:
        stat = os.fstat(fd)
        if stat.st_size < needed or needed < 0:
            raise RefusedHandle(f"segment {name!r} holds {stat.st_size} bytes, the handle needs {needed}")
        with _lock:
            entry = _by_inode.get((stat.st_dev, stat.st_ino))
            known = _live(entry)
            if known is not None and entry is not None:
                _remember(name, entry)
        if known is not None:
            return known  # we map it already: reuse
        own = _new_name()
        os.link(os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, own))
        try:
            segment = _register(own, fd, stat.st_size)
        except BaseException:
            os.unlink(os.path.join(SHM_DIR, own))
            raise
        with _lock:
            _remember(name, _by_inode[segment.inode])
        return segment
    finally:
        os.close(fd)


def pin(peer: bytes, segment: Segment) -> None:
    """Keep ``segment`` mapped until ``peer`` acknowledges it (or goes away)."""
    with _lock:
        _pins.setdefault(peer, {}).setdefault(segment.name, _Pin(segment)).count += 1


def unpin(peer: bytes, names: list[object]) -> None:
    """``peer`` acknowledged these segments (once per send)."""
    released: list[_Pin] = []  # freed after the lock: a mapping's finalizer takes it
    with _lock:
        pins = _pins.get(peer)
        if not pins:
            return
        for name in names:
            if isinstance(name, str) and (entry := pins.get(name)) is not None:
                entry.count -= 1
                if entry.count <= 0:
                    released.append(pins.pop(name))
    del released


def drop_peer(peer: bytes) -> None:
    """``peer`` is gone: nothing stays pinned for it."""
    with _lock:
        released = _pins.pop(peer, None)
    del released  # outside the lock: a mapping's finalizer takes it


def pinned() -> int:
    """How many segments are pinned for receivers (for tests and diagnostics)."""
    with _lock:
        return sum(len(p) for p in _pins.values())


def sweep(actor: str | None = None) -> int:
    """Unlink this session's names of ``actor`` (all actors if None); return how many.

    Only names go: memory that a live mapping still uses stays until it is unmapped.
    """
    removed = 0
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for entry in entries:
        match = _NAME_RE.fullmatch(entry)
        if match and match.group(1) == _session and (actor is None or match.group(2) == actor):
            try:
                os.unlink(os.path.join(SHM_DIR, entry))
                removed += 1
            except OSError:
                pass
    return removed


def sweep_dead_sessions() -> None:
    """Unlink segments of sessions whose host process is gone (a SIGKILLed host)."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return
    for entry in entries:
        match = _NAME_RE.fullmatch(entry)
        if match is None:
            continue
        pid = int(match.group(1).split("x")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, entry))
            except OSError:
                pass
        except OSError:
            continue

