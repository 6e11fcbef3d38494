"""This process's mappings of segments, by id, inode and address; pins until acknowledged.

A segment is a sealed memfd (``_memfd``) mapped with mmap. Its id is ``<owner actor>:<32 hex>``:
the actor that shares it, and 16 random bytes. Knowing the id is the capability to map the
segment; a receiver also checks the owner against the true sender (the broker stamps it), so a
peer cannot pass on what it did not create. Each mapping keeps its own descriptor (closed with
it), so that the process can share the segment again under an id of its own.

Lifetime by acknowledgement: a sender pins the mapping of every segment it sends until the
receiver acknowledges (ACK, once it maps the segment itself) or goes away, so a sender that
drops its tensor right after sending cannot take the memory from under the receiver. ACKs name
the id's token only (32 characters, so 64 fit in a header).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Protocol

from . import _memfd
from ._channel import MAX_SEGMENTS_PER_WORKER
from ._memfd import NoRoom, RefusedHandle

__all__ = ["Segment", "Source", "ack_key", "create", "drop_peer", "find", "own_fd", "pin", "pinned",
           "receive", "share", "warn_copy"]

logger = logging.getLogger("pyisolate.shm")

_ID_RE = re.compile(r"([A-Za-z0-9_.-]{1,64}):([0-9a-f]{32})")
#: Host-side actors share the host's memory: their segments are all owned by "host".
HOST = "host"
#: Ids a mapping is remembered by, besides its own (see ``_alias``).
_MAX_ALIASES = 8


class Source(Protocol):
    """Where descriptors of other actors' segments come from, and where ours go (the channel)."""

    def fetch(self, segment_id: str) -> int:
        """A new descriptor of ``segment_id`` that the caller owns; RefusedHandle if none."""
    def put(self, segment_id: str, fd: int) -> None:
        """Make our segment ``segment_id`` available to others (OSError if it cannot)."""
    def drop(self, segment_id: str) -> None:
        """Our mapping of ``segment_id`` died; never blocks."""


class _Mapping:
    """One mmap of a segment in this process, and the ids it is known by here."""
    __slots__ = ("mm", "fd", "size", "inode", "address", "own_id", "put", "ids", "__weakref__")

    def __init__(self, mm: mmap.mmap, fd: int, size: int, inode: tuple[int, int], address: int,
                 received_as: str | None, own_id: str | None) -> None:
        self.mm = weakref.ref(mm)
        self.fd = fd  # -1 when the descriptor budget was spent: mapped, but not shareable again
        self.size = size
        self.inode = inode
        self.address = address
        self.own_id = own_id  # the id we share it under (made on first need)
        self.put = False  # the host holds a descriptor under own_id (workers)
        self.ids = [i for i in (received_as, own_id) if i is not None]  # every id it is known by here


@dataclass(eq=False)
class Segment:
    """A live mapping of a segment (holding it keeps the mapping alive)."""
    mm: mmap.mmap
    mapping: _Mapping

    @property
    def size(self) -> int:
        return self.mapping.size


@dataclass(eq=False)
class _Pin:
    segment: Segment
    count: int = 0


class _State:
    """Who this process is, in shared-memory terms (set by ``configure``)."""
    session = ""
    actor = ""
    source: Source | None = None
    shares_by_put = False  # a worker: segments reach the host by PUT
    put_live = 0  # worker: ids PUT and not dropped
    warned = False


state = _State()
# Re-entrant: dropping a pin can free a mapping, whose finalizer takes the lock again.
_lock = threading.RLock()
# Live mappings, held weakly (tensors and arrays keep them alive). Entries leave with their mapping.
_by_id: dict[str, _Mapping] = {}
_by_inode: dict[tuple[int, int], _Mapping] = {}
_by_address: dict[int, _Mapping] = {}
# Mappings pinned for receivers that have not acknowledged yet: peer -> ack key -> pin.
_pins: dict[bytes, dict[str, _Pin]] = {}


def _new_id() -> str:
    if not state.actor:
        raise RuntimeError("shared memory is not configured in this process")
    return f"{state.actor}:{os.urandom(16).hex()}"


def ack_key(segment_id: str) -> str:
    """What a receiver sends back to acknowledge ``segment_id`` (its random part)."""
    return segment_id.rpartition(":")[2]


def _address(mm: mmap.mmap) -> int:
    import ctypes

    view = (ctypes.c_char * 1).from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _live(mapping: _Mapping | None) -> Segment | None:
    if mapping is None:
        return None
    mm = mapping.mm()
    if mm is None or mm.closed:
        return None
    return Segment(mm, mapping)


def _register(mm: mmap.mmap, fd: int, st: os.stat_result, received_as: str | None, own_id: str | None) -> Segment:
    mapping = _Mapping(mm, fd, st.st_size, (st.st_dev, st.st_ino), _address(mm), received_as, own_id)
    with _lock:
        for i in mapping.ids:
            _by_id[i] = mapping
        _by_inode[mapping.inode] = mapping
        _by_address[mapping.address] = mapping
    weakref.finalize(mm, _forget, mapping)
    return Segment(mm, mapping)


def _forget(mapping: _Mapping) -> None:
    """The mapping died (any thread): forget it, close its descriptor, tell the host."""
    with _lock:
        for i in mapping.ids:
            if _by_id.get(i) is mapping:
                del _by_id[i]
        if _by_inode.get(mapping.inode) is mapping:
            del _by_inode[mapping.inode]
        if _by_address.get(mapping.address) is mapping:
            del _by_address[mapping.address]
        fd, mapping.fd = mapping.fd, -1
        put, mapping.put = mapping.put, False
        if put:
            state.put_live -= 1
    if fd >= 0:
        os.close(fd)
        _memfd.let_go()
    if put and state.source is not None and mapping.own_id is not None:
        state.source.drop(mapping.own_id)


def create(size: int) -> Segment:
    """A new zero-filled segment of ``size`` bytes, owned by this actor.

    Raises:
        NoRoom: no memory, file size or descriptor for it: send a copy instead (``warn_copy``).
    """
    if not _memfd.hold():
        raise NoRoom(size, OSError(24, "too many shared segments open (half the open-file limit)"))
    try:
        fd = _memfd.create(size)
    except BaseException:
        _memfd.let_go()
        raise
    try:
        # Not MAP_POPULATE: measured, mapping the pages as the copy touches them is faster.
        mm = mmap.mmap(fd, size)
        return _register(mm, fd, os.fstat(fd), None, _new_id())
    except BaseException as exc:
        os.close(fd)
        _memfd.let_go()
        if isinstance(exc, OSError):
            raise NoRoom(size, exc) from None
        raise


def find(address: int) -> Segment | None:
    """The segment whose mapping starts at ``address``, if it is one of ours."""
    return _live(_by_address.get(address))


def share(dest: bytes, segment: Segment) -> str:
    """The id to name ``segment`` by in a message to ``dest``; pins it until ``dest`` acknowledges.

    Always an id of ours (made once per mapping), which a worker PUTs to the host once, before
    the message leaves. Not the id we received it under, even going back to its owner: the
    owner's mapping may have died since, and with it that id; ours lives as long as our mapping,
    which the pin keeps. The owner finds the memory it already maps by its inode.

    Raises:
        NoRoom: it cannot be shared (descriptor budget, PUT bound, or the host is gone): send a copy.
    """
    mapping = segment.mapping
    segment_id = _own_id(mapping)
    if state.shares_by_put and not mapping.put:
        _put(segment_id, mapping)
    elif mapping.fd < 0:
        raise NoRoom(mapping.size, OSError(24, "no descriptor left to share this segment with"))
    pin(dest, segment, ack_key(segment_id))
    return segment_id


def _own_id(mapping: _Mapping) -> str:
    with _lock:
        if mapping.own_id is None:
            mapping.own_id = _new_id()
            mapping.ids.append(mapping.own_id)
            _by_id[mapping.own_id] = mapping
        return mapping.own_id


def _put(segment_id: str, mapping: _Mapping) -> None:
    assert state.source is not None
    with _lock:
        if mapping.fd < 0 or state.put_live >= MAX_SEGMENTS_PER_WORKER:
            raise NoRoom(mapping.size, OSError(24, f"{MAX_SEGMENTS_PER_WORKER} segments are shared already"))
        try:
            state.source.put(segment_id, mapping.fd)
        except OSError as exc:
            raise NoRoom(mapping.size, exc) from None
        mapping.put = True
        state.put_live += 1


def own_fd(segment_id: str) -> int | None:
    """A new descriptor (the caller's to close) of our live segment ``segment_id``, if any."""
    with _lock:  # the mapping's finalizer closes its descriptor under this lock
        mapping = _by_id.get(segment_id)
        if mapping is None or mapping.own_id != segment_id or mapping.fd < 0 or _live(mapping) is None:
            return None
        try:
            return os.dup(mapping.fd)
        except OSError:
            return None


def receive(segment_id: object, sender: str, needed: int, sender_in_host: bool = False) -> Segment:
    """Map the segment a message from ``sender`` names, after checking it.

    ``sender_in_host``: the sender is an actor of the host process, whose segments are all
    owned by ``host``. A segment mapped here already (by id, or else by inode) is reused.

    Raises:
        RefusedHandle: malformed id, not the sender's segment, unknown, not a sealed memfd,
            or smaller than ``needed``. Nothing was mapped.
    """
    if type(segment_id) is not str or not (match := _ID_RE.fullmatch(segment_id)):
        raise RefusedHandle(f"malformed segment id {segment_id!r}")
    owner = match[1]
    if not (owner == sender or (owner == HOST and sender_in_host)):
        raise RefusedHandle(f"segment {segment_id!r} was not shared by {sender!r}")
    with _lock:
        known = _live(_by_id.get(segment_id))
    if known is not None:
        if not 0 <= needed <= known.size:
            raise RefusedHandle(f"segment {segment_id!r} holds {known.size} bytes, the handle needs {needed}")
        return known
    if state.source is None:
        raise RefusedHandle("shared memory is not configured in this process")
    fd = state.source.fetch(segment_id)
    try:
        st = _memfd.check(fd, needed)
        if st.st_size == 0:
            raise RefusedHandle(f"segment {segment_id!r} is empty")
        with _lock:
            known = _live(_by_inode.get((st.st_dev, st.st_ino)))
            if known is not None:  # mapped already, under another id: reuse it
                _alias(known.mapping, segment_id)
                return known
        try:
            mm = mmap.mmap(fd, st.st_size)
        except (OSError, ValueError) as exc:
            raise RefusedHandle(f"segment {segment_id!r} cannot be mapped: {exc}") from None
        keep = _memfd.hold()  # else mapped, not shareable again
        segment = _register(mm, fd if keep else -1, st, segment_id, None)
        if keep:
            fd = -1
        return segment
    finally:
        if fd >= 0:
            os.close(fd)


def _alias(mapping: _Mapping, segment_id: str) -> None:
    """Know ``mapping`` by ``segment_id`` too; forget its oldest other ids past a few (lock held).

    A segment that goes back and forth gets a new id from each new mapping of it elsewhere; a
    long-lived mapping here must not collect them without end. A forgotten id costs the next
    receipt of it one check, which finds this mapping again by its inode.
    """
    mapping.ids.append(segment_id)
    _by_id[segment_id] = mapping
    others = [i for i in mapping.ids if i != mapping.own_id]
    for old in others[:-_MAX_ALIASES]:
        mapping.ids.remove(old)
        if _by_id.get(old) is mapping:
            del _by_id[old]


def pin(peer: bytes, segment: Segment, key: str) -> None:
    """Keep ``segment`` mapped until ``peer`` acknowledges ``key`` (or goes away)."""
    with _lock:
        _pins.setdefault(peer, {}).setdefault(key, _Pin(segment)).count += 1


def unpin(peer: bytes, keys: list[object]) -> None:
    """``peer`` acknowledged these segments (once per send)."""
    released: list[_Pin] = []  # freed after the lock: a mapping's finalizer takes it
    with _lock:
        pins = _pins.get(peer)
        if not pins:
            return
        for key in keys:
            if isinstance(key, str) and (entry := pins.get(key)) is not None:
                entry.count -= 1
                if entry.count <= 0:
                    released.append(pins.pop(key))
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


def mapped() -> int:
    """How many segments this process maps (for tests and diagnostics)."""
    with _lock:
        return sum(1 for m in _by_address.values() if _live(m) is not None)


def warn_copy(exc: NoRoom, what: str) -> None:
    """Say once per process that values travel as copies because shared memory has no room."""
    if state.warned:
        return
    state.warned = True
    logger.warning(
        "shared memory cannot hold a %s of %d bytes (%s), so it travels as a copy through the "
        "socket; so will any other value that does not fit (this warning is shown once). Fix: %s",
        what, exc.size, exc.reason, exc.fix,
    )
