"""This process's mappings of segments, by id, inode and address; leases, and pins until released.

A segment is a sealed memfd (``_memfd``) mapped with mmap. Its id is ``<owner actor>:<token>``:
the actor that shares it, and 16 random bytes in hex (``p`` before them: the segment belongs to
its owner's pool, see ``_pool``). Knowing the id is the capability to map the segment; a
receiver also checks the owner against the true sender (the broker stamps it), so a peer
cannot pass on what it did not create. Each mapping keeps its own descriptor (closed with it),
so that the process can share the segment again under an id of its own.

Leases: nothing but a mapping's ``_Lease`` (a ctypes array over the mapping, which torch and
numpy keep as the owner of their memory) is handed out, one at a time per mapping. The lease's
death is the one moment a mapping's memory is no longer used in this process: an own segment
is then unmapped, a pooled one goes back to its pool, and a received one is released to its
sender (and unmapped, unless it is pooled and kept in the receive cache, ``_cache``). Pins
(``_pins``) hold the leases a sender keeps for its receivers.

Lifetime by release: a sender pins (holds the lease of) every segment it sends until the
receiver releases it (ACK, once the receiver's own lease dies) or goes away, so neither a
sender that drops its tensor right after sending, nor a pool that reuses memory, can take it
from under the receiver. Sending a segment back to an actor we received it from pins nothing:
that actor holds it until we release it. A receiver that shared the segment on with a third
actor marks its release (``!`` before the token, "tainted"): the owner then never reuses it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import _memfd, _pins
from ._cache import ReceiveCache
from ._channel import MAX_SEGMENTS_PER_WORKER
from ._memfd import NoRoom, RefusedHandle

__all__ = ["Owe", "Segment", "Source", "ack_key", "cached", "create", "find", "is_lease", "lease", "leased",
           "mapped", "own_fd", "receive", "share", "uncache", "unmap"]

logger = logging.getLogger("pyisolate.shm")

_ID_RE = re.compile(r"([A-Za-z0-9_.-]{1,64}):(p?[0-9a-f]{32})")
#: Host-side actors share the host's memory: their segments are all owned by "host".
HOST = "host"
#: Ids a mapping is remembered by, besides its own (see ``_alias``).
_MAX_ALIASES = 8
#: Largest received pooled segment that goes on to a third actor as a copy (``copies_forward``).
FORWARD_COPY_MAX = 64 << 20

#: Who a received segment's release goes to: called (from any thread) with the ack key.
Owe = Callable[[str], None]


class Source(Protocol):
    """Where descriptors of other actors' segments come from, and where ours go (the channel)."""

    def fetch(self, segment_id: str) -> int:
        """A new descriptor of ``segment_id`` that the caller owns; RefusedHandle if none."""
    def put(self, segment_id: str, fd: int) -> None:
        """Make our segment ``segment_id`` available to others (OSError if it cannot)."""
    def drop(self, segment_id: str) -> None:
        """Our mapping of ``segment_id`` died; never blocks."""


OWN, POOLED, RECEIVED = 0, 1, 2


class _Use:
    """What one lease of a mapping owes when it dies: releases to senders, and whether it was shared on."""
    __slots__ = ("owed", "reshared")

    def __init__(self) -> None:
        self.owed: list[tuple[str, Owe, str]] = []  # (sender, its release, the id it named)
        self.reshared = False


class _Mapping:
    """One mmap of a segment in this process, the ids it is known by here, and its current lease."""
    __slots__ = ("mm", "fd", "size", "inode", "address", "own_id", "put", "ids", "kind", "lease", "use",
                 "peer", "tainted", "cached", "__weakref__")

    def __init__(self, mm: mmap.mmap, fd: int, size: int, inode: tuple[int, int], address: int,
                 received_as: str | None, own_id: str | None, kind: int) -> None:
        self.mm: mmap.mmap | None = mm  # None once unmapped
        self.fd = fd  # -1 when the descriptor budget was spent: mapped, but not shareable again
        self.size = size
        self.inode = inode
        self.address = address
        self.own_id = own_id  # the id we share it under (made on first need)
        self.put = False  # the host holds a descriptor under own_id (workers)
        self.ids = [i for i in (received_as, own_id) if i is not None]  # every id it is known by here
        self.kind = kind
        self.lease: weakref.ref[ctypes.Array[ctypes.c_char]] | None = None
        self.use = _Use()
        self.peer: bytes | None = None  # pooled: the one actor (besides trusted ones) that saw it
        self.tainted = False  # pooled: seen by more than one actor, or shared on: never reused
        self.cached = False  # received and pooled: kept mapped in the receive cache


@functools.lru_cache(maxsize=64)
def _lease_type(size: int) -> type[ctypes.Array[ctypes.c_char]]:
    """The lease class of mappings of ``size`` bytes (a ctypes char array; weakly referable)."""
    return type("_Lease", (ctypes.Array,), {"_type_": ctypes.c_char, "_length_": size, "_pyisolate_lease": True})


def is_lease(obj: object) -> bool:
    """Whether ``obj`` is a lease of a mapping (what torch and numpy hold our memory by)."""
    return getattr(type(obj), "_pyisolate_lease", False) is True


@dataclass(eq=False)
class Segment:
    """A lease of a mapping: holding it keeps the memory this process's to use and share."""
    mm: ctypes.Array[ctypes.c_char]  # the lease: a writable buffer over the whole segment
    mapping: _Mapping

    @property
    def size(self) -> int:
        return self.mapping.size


class _State:
    """Who this process is, in shared-memory terms (set by ``configure``)."""
    session = ""
    actor = ""
    source: Source | None = None
    shares_by_put = False  # a worker: segments reach the host by PUT
    put_live = 0  # worker: ids PUT and not dropped
    #: Actors whose sight of a pooled segment does not stop its reuse for others (a worker's host).
    trusted: frozenset[bytes] = frozenset()


state = _State()
#: Bytes of segments this process shared with each peer (by actor name), and received from each
#: (by sender name), for statistics: counted once per message that names a segment.
shared_out: dict[bytes, int] = {}
shared_in: dict[str, int] = {}


def _no_pool(mapping: _Mapping) -> bool:
    return False


#: Takes back a pooled mapping whose lease died (lock held); False: unmap it. Set by ``_pool``.
give_back: Callable[[_Mapping], bool] = _no_pool
# Re-entrant: dropping a pin can end a lease, whose finalizer takes the lock again.
_lock = threading.RLock()
# Live mappings. Entries leave when the mapping is unmapped.
_by_id: dict[str, _Mapping] = {}
_by_inode: dict[tuple[int, int], _Mapping] = {}
_by_address: dict[int, _Mapping] = {}
# Mappings of others' pooled segments kept unleased, for their next receipt.
cache: ReceiveCache[_Mapping] = ReceiveCache()


def _new_id(pooled: bool = False) -> str:
    if not state.actor:
        raise RuntimeError("shared memory is not configured in this process")
    return f"{state.actor}:{'p' if pooled else ''}{os.urandom(16).hex()}"


def ack_key(segment_id: str) -> str:
    """What a receiver sends back to release ``segment_id`` (its token)."""
    return segment_id.rpartition(":")[2]


def _address(mm: object) -> int:
    view = (ctypes.c_char * 1).from_buffer(mm)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _lease(mapping: _Mapping) -> Segment:
    """The mapping's current lease, made if it has none (lock held)."""
    lease = mapping.lease() if mapping.lease is not None else None
    if lease is None:
        assert mapping.mm is not None
        cache.take(mapping)
        lease = _lease_type(mapping.size).from_buffer(mapping.mm)
        use = mapping.use = _Use()
        mapping.lease = weakref.ref(lease)
        weakref.finalize(lease, _lease_ended, mapping, use)
    return Segment(lease, mapping)


def _leased(mapping: _Mapping | None) -> Segment | None:
    """The mapping's live lease, if any (lock held)."""
    if mapping is None or mapping.lease is None:
        return None
    lease = mapping.lease()
    return None if lease is None else Segment(lease, mapping)


def _lease_ended(mapping: _Mapping, use: _Use) -> None:
    """A lease died (any thread): release what it received, and give back or unmap its mapping."""
    close: list[_Mapping] = []
    with _lock:
        if _leased(mapping) is None and mapping.mm is not None:  # no newer lease was made meanwhile
            mapping.lease = None
            if mapping.kind == POOLED:
                close = [] if give_back(mapping) else [mapping]
            elif mapping.kind == RECEIVED and mapping.cached:
                close = cache.keep(mapping)
            else:
                close = [mapping]
    for done in close:
        unmap(done)
    mark = _pins.TAINT if use.reshared else ""
    for _, owe, segment_id in use.owed:
        key = ack_key(segment_id)
        try:
            owe(mark + key)
        except Exception:  # a finalizer must not raise; the peer's pin goes when the peer does
            logger.debug("could not release segment %s", key, exc_info=True)


def _register(mm: mmap.mmap, fd: int, st: os.stat_result, received_as: str | None, own_id: str | None,
              kind: int) -> _Mapping:
    mapping = _Mapping(mm, fd, st.st_size, (st.st_dev, st.st_ino), _address(mm), received_as, own_id, kind)
    with _lock:
        for i in mapping.ids:
            _by_id[i] = mapping
        _by_inode[mapping.inode] = mapping
        _by_address[mapping.address] = mapping
    return mapping


def unmap(mapping: _Mapping) -> None:
    """Forget the mapping, unmap it, close its descriptor and tell the host (no lease may be alive)."""
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
        mm, mapping.mm = mapping.mm, None
        if put:
            state.put_live -= 1
    if mm is not None:
        try:
            mm.close()
        except BufferError:  # a view made around the lease still exports it: unmapped when it goes
            pass
    if fd >= 0:
        os.close(fd)
        _memfd.let_go()
    if put and state.source is not None and mapping.own_id is not None:
        state.source.drop(mapping.own_id)


def create(size: int, *, pooled: bool = False) -> Segment:
    """A new zero-filled segment of ``size`` bytes, owned by this actor (``pooled``: by its pool).

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
        mapping = _register(mm, fd, os.fstat(fd), None, _new_id(pooled), POOLED if pooled else OWN)
    except BaseException as exc:
        os.close(fd)
        _memfd.let_go()
        if isinstance(exc, OSError):
            raise NoRoom(size, exc) from None
        raise
    with _lock:
        return _lease(mapping)


def lease(mapping: _Mapping) -> Segment:
    """A lease of ``mapping`` (a pooled one, taken from its pool)."""
    with _lock:
        return _lease(mapping)


def find(address: int) -> Segment | None:
    """The leased segment whose mapping starts at ``address``, if it is one of ours."""
    with _lock:
        return _leased(_by_address.get(address))


def share(dest: bytes, segment: Segment) -> str:
    """The id to name ``segment`` by in a message to ``dest``; pins it until ``dest`` releases it.

    An id of ours (made once per mapping), which a worker PUTs to the host once, before the
    message leaves; ours lives as long as our mapping, which the pin keeps. Going back to an
    actor that sent it to us and that we have not released it to yet, that actor's own id:
    it is alive, as that actor keeps the segment until we release it.

    Raises:
        NoRoom: it cannot be shared (descriptor budget, PUT bound, or the host is gone): send a copy.
    """
    mapping = segment.mapping
    with _lock:
        back = _named_by(mapping, dest)
    if back is not None:
        # ``dest`` sent it to us and keeps it until we release it (our lease, alive now, owes
        # that release): name it by ``dest``'s own id, and pin nothing (a pin here would wait
        # for ``dest``'s lease, which waits for ours: neither would end).
        return back
    segment_id = _own_id(mapping)
    if state.shares_by_put and not mapping.put:
        _put(segment_id, mapping)
    elif mapping.fd < 0:
        raise NoRoom(mapping.size, OSError(24, "no descriptor left to share this segment with"))
    with _lock:
        if mapping.kind == POOLED:
            if mapping.peer is None or mapping.peer in state.trusted:
                mapping.peer = dest
            elif mapping.peer != dest:
                mapping.tainted = True
        elif mapping.kind == RECEIVED:
            mapping.use.reshared = True  # its owner must not reuse it: a third actor maps it now
    _pins.pin(dest, segment, ack_key(segment_id))
    shared_out[dest] = shared_out.get(dest, 0) + mapping.size
    return segment_id


def copies_forward(segment: Segment, dest: bytes) -> bool:
    """Whether ``segment``, received from its owner's pool, goes on to ``dest`` (not the actor
    it came from) better as a copy into a segment of ours.

    Passed on, a third actor would map it, so its owner could never reuse it (see ``tainted``):
    a chain of nodes (pack A -> host -> pack B) would make its owner create and fault a new
    segment for every value. Up to ``FORWARD_COPY_MAX`` a warm copy costs less, and the
    received segment goes back to its owner's pool once our last view of it is gone.
    """
    mapping = segment.mapping
    if mapping.kind != RECEIVED or not mapping.cached or mapping.size > FORWARD_COPY_MAX:
        return False  # the common case (our own segment, sent again) takes no lock
    with _lock:
        return _named_by(mapping, dest) is None


def _named_by(mapping: _Mapping, dest: bytes) -> str | None:
    """The id ``dest`` (or its process, the host's) sent us ``mapping``'s segment under, if our
    current lease still owes ``dest`` its release (lock held)."""
    for sender, _, segment_id in mapping.use.owed:
        owner = segment_id.partition(":")[0]
        if sender.encode() == dest or (owner == HOST and dest in state.trusted):
            return segment_id
    return None


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
    """A new descriptor (the caller's to close) of our leased segment ``segment_id``, if any."""
    with _lock:  # unmap closes the descriptor under this lock
        mapping = _by_id.get(segment_id)
        if mapping is None or mapping.own_id != segment_id or mapping.fd < 0 or _leased(mapping) is None:
            return None
        try:
            return os.dup(mapping.fd)
        except OSError:
            return None


def receive(segment_id: object, sender: str, needed: int, sender_in_host: bool = False,
            owe: Owe | None = None) -> Segment:
    """Map the segment a message from ``sender`` names, after checking it.

    ``sender_in_host``: the sender is an actor of the host process, whose segments are all
    owned by ``host``. A segment mapped here already (by id, or else by inode) is reused. An id
    of ours comes back only from an actor we sent it to and that has not released it.
    ``owe``: called with the key to release once this process's lease of the segment dies.

    Raises:
        RefusedHandle: malformed id, not the sender's segment, unknown, not a sealed memfd,
            or smaller than ``needed``. Nothing was mapped.
    """
    if type(segment_id) is not str or not (match := _ID_RE.fullmatch(segment_id)):
        raise RefusedHandle(f"malformed segment id {segment_id!r}")
    if needed > 0:
        shared_in[sender] = shared_in.get(sender, 0) + needed
    owner = match[1]
    if owner == state.actor:
        return _back(segment_id, sender, needed)
    if not (owner == sender or (owner == HOST and sender_in_host)):
        raise RefusedHandle(f"segment {segment_id!r} was not shared by {sender!r}")
    with _lock:
        known = _by_id.get(segment_id)
        if known is not None and known.mm is not None:
            if not 0 <= needed <= known.size:
                raise RefusedHandle(f"segment {segment_id!r} holds {known.size} bytes, the handle needs {needed}")
            return _owing(_lease(known), sender, owe, segment_id)
    if state.source is None:
        raise RefusedHandle("shared memory is not configured in this process")
    fd = state.source.fetch(segment_id)
    try:
        st = _memfd.check(fd, needed)
        if st.st_size == 0:
            raise RefusedHandle(f"segment {segment_id!r} is empty")
        with _lock:
            known = _by_inode.get((st.st_dev, st.st_ino))
            if known is not None and known.mm is not None:  # mapped already, under another id: reuse it
                _alias(known, segment_id)
                return _owing(_lease(known), sender, owe, segment_id)
        try:
            mm = mmap.mmap(fd, st.st_size)
        except (OSError, ValueError) as exc:
            raise RefusedHandle(f"segment {segment_id!r} cannot be mapped: {exc}") from None
        keep = _memfd.hold()  # else mapped, not shareable again
        mapping = _register(mm, fd if keep else -1, st, segment_id, None, RECEIVED)
        mapping.cached = match[2].startswith("p")  # pooled by its owner: likely to come again
        if keep:
            fd = -1
        with _lock:
            return _owing(_lease(mapping), sender, owe, segment_id)
    finally:
        if fd >= 0:
            os.close(fd)


def _owing(segment: Segment, sender: str, owe: Owe | None, segment_id: str) -> Segment:
    if owe is not None:
        segment.mapping.use.owed.append((sender, owe, segment_id))
    return segment


def _back(segment_id: str, sender: str, needed: int) -> Segment:
    """One of our own segments, coming back from ``sender``, to whom we sent it and who has not
    released it yet (so our lease of it is alive); nothing is owed for it."""
    with _lock:
        mapping = _by_id.get(segment_id)
        if (mapping is None or mapping.own_id != segment_id or _leased(mapping) is None
                or not _pins.holds(sender.encode(), ack_key(segment_id))):
            raise RefusedHandle(f"segment {segment_id!r} is not one of ours that {sender!r} holds")
        if not 0 <= needed <= mapping.size:
            raise RefusedHandle(f"segment {segment_id!r} holds {mapping.size} bytes, the handle needs {needed}")
        return _lease(mapping)


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


def mapped() -> int:
    """How many segments this process maps (for tests and diagnostics)."""
    with _lock:
        return sum(1 for m in _by_address.values() if m.mm is not None)


def leased() -> int:
    """How many mappings are in use here (leased): by values, or pinned for receivers."""
    with _lock:
        return sum(1 for m in _by_address.values() if _leased(m) is not None)


def uncache(name: str | None = None) -> None:
    """Unmap the receive cache's mappings: those received from actor ``name``, or all of them."""
    with _lock:
        gone = cache.remove([m for m in cache.entries.values()
                             if name is None or any(i.partition(":")[0] == name for i in m.ids)])
    for mapping in gone:
        unmap(mapping)


def cached() -> int:
    """Received mappings kept in the receive cache with no lease (for tests and diagnostics)."""
    with _lock:
        return len(cache)
