"""Shared memory for tensors and large arrays: sealed memfds, their descriptors passed by the host.

- ``_memfd``: a segment is a memfd with every page reserved and sealed against shrinking and
  growing, so no holder can make another one's mapping fault; receivers check that before
  mapping (``check``). Where no segment can be had (memory, file-size or descriptor limits)
  ``NoRoom`` tells the sender to send a copy through the socket instead, with one warning.
- ``_segments``: this process's mappings, ids (``<owner>:<random>``, the capability), the
  checks a received handle passes, leases (what values hold), pins until released, and the
  receive cache of pooled segments.
- ``_pool``: the bounded pool of this process's segments in size classes, reused once every
  holder released them (fresh values then cost a warm copy, or none with ``shared_empty``).
- ``_channel``: the private socketpair between the host and each worker, which carries the
  bootstrap and the segments' descriptors (SCM_RIGHTS); ``_hub``: the host's end of them all.

The rest of pyisolate uses what this module names.
"""

from __future__ import annotations

import atexit
import os
from typing import TYPE_CHECKING

from . import _memfd, _pins
from ._channel import MAX_SEGMENTS_PER_WORKER, WorkerChannel, descriptors
from ._layout import extent
from ._memfd import NoRoom, RefusedHandle, warn_copy
from ._pins import pin, pinned, unpin
from ._pool import bound as pool_bound
from ._pool import class_of, parse_size, pool, take
from ._pool import configure as configure_pool
from ._segments import (
    Owe,
    Segment,
    Source,
    ack_key,
    cached,
    copies_forward,
    create,
    find,
    is_lease,
    leased,
    mapped,
    receive,
    share,
    state,
    uncache,
)
from ._segments import FORWARD_COPY_MAX, shared_in, shared_out
from ._segments import _address as _address

if TYPE_CHECKING:  # the hub is host-only code: a worker never imports it
    import asyncio
    import socket

    from ._hub import HostChannel as HostChannel
    from ._hub import Hub

__all__ = [
    "FORWARD_COPY_MAX", "MAX_SEGMENTS_PER_WORKER", "NoRoom", "Owe", "RefusedHandle", "Segment", "Source",
    "WorkerChannel", "ack_key", "attach_worker", "cached", "class_of", "copies_forward", "configure",
    "configure_host", "configure_pool", "create", "descriptors", "drop_peer", "extent", "find", "hub",
    "is_lease", "leased", "mapped", "new_segment", "parse_size", "pin", "pinned", "pool", "pool_bound", "probe",
    "receive", "session", "share",
    "shares_with", "apart", "stats", "sweep", "take", "traffic", "trim", "uncache", "unpin", "warn_copy",
]  # fmt: skip

_hub: Hub | None = None


def probe(size: int = 1 << 20) -> None:
    """Make one sealed segment of ``size`` bytes and let it go (``pyisolate doctor``'s check).

    Raises:
        OSError: no segment can be had here; a ``NoRoom`` carries a ``fix`` to tell the user.
    """
    os.close(_memfd.create(size))


def configure(session: str, actor: str, *, source: Source | None = None,
              trusted: frozenset[bytes] = frozenset(), pool_bytes: int | None = None) -> None:
    """Name the segments this process creates (each worker calls this once).

    ``source``: the worker's control channel, through which our segments reach the host and
    other actors' segments come. ``trusted``: actors whose sight of a pooled segment does not
    keep it from being reused for others (a worker's host). ``pool_bytes``: the bound of the
    pool (None: ``PYISOLATE_SHM_POOL``, else 512 MiB).
    """
    state.session, state.actor = session, actor
    state.source = source
    state.shares_by_put = source is not None
    state.trusted = trusted
    configure_pool(pool_bytes)


def new_segment(size: int, dest: bytes | None) -> Segment:
    """A segment of at least ``size`` bytes for a value going to ``dest``: from the pool if it can.

    Raises:
        NoRoom: no memory, file size or descriptor for it: send a copy instead (``warn_copy``).
    """
    return take(size, dest) or create(size)


def configure_host() -> str:
    """Make this process the host of shared memory (once): the hub that holds the workers' segments."""
    global _hub
    if _hub is None:
        from ._hub import Hub
        from ._segments import own_fd

        _hub = Hub(own_fd)
        configure(f"{os.getpid()}x{os.urandom(4).hex()}", "host", source=_hub)
        state.shares_by_put = False  # GETs are answered from the host's own mappings
        atexit.register(sweep)
    return state.session


def session() -> str:
    """The session of this host and its workers ('' before configure)."""
    return state.session


#: Actors this process shares no memory with (workers on other machines, see
#: ``ExtensionConfig.remote``): tensors and arrays go to them as buffer frames.
apart: set[bytes] = set()


def shares_with(dest: bytes | None) -> bool:
    """Whether values for ``dest`` may travel as segments: we have a session (a remote worker
    has none) and ``dest`` is not on another machine."""
    return bool(state.session) and dest not in apart


def hub() -> Hub | None:
    """The host's hub (None in a worker, or before ``configure_host``)."""
    return _hub


def attach_worker(name: str, sock: socket.socket, loop: asyncio.AbstractEventLoop, boot: bytes) -> HostChannel:
    """Take the host's end ``sock`` of worker ``name``'s channel: send ``boot``, then serve it on ``loop``."""
    configure_host()
    assert _hub is not None
    channel = _hub.attach(name, sock, loop)
    channel.send_boot(boot)
    return channel


def sweep(actor: str | None = None) -> int:
    """Close what the host holds for worker ``actor`` (every worker if None), once it has exited.

    Segments live in no file system: a worker's memory goes with its last mapping, and its
    descriptors here with its channel. Returns how many channels were closed.
    """
    return _hub.sweep(actor) if _hub is not None else 0


def drop_peer(peer: bytes) -> None:
    """``peer`` is gone: nothing stays pinned for it (and what it held is never reused), and what
    it sent us leaves the receive cache."""
    _pins.drop(peer)
    uncache(peer.decode(errors="replace"))


def trim() -> None:
    """Unmap what this process keeps for reuse: free segments of its pool, and the receive cache
    (a manager's last act: nothing of its work stays mapped)."""
    pool.trim()
    uncache()


def traffic(peer: bytes, *, forget: bool = False) -> tuple[int, int]:
    """Bytes of segments shared with ``peer`` and received from it, so far; ``forget``: and
    stop counting them (the peer is gone for good)."""
    if forget:
        return shared_out.pop(peer, 0), shared_in.pop(peer.decode(errors="replace"), 0)
    return shared_out.get(peer, 0), shared_in.get(peer.decode(errors="replace"), 0)


def stats() -> dict[str, object]:
    """Counts for tests and diagnostics: descriptors held, mappings (all, leased, kept in the
    receive cache), pins, the pool's bound, bytes and reuse; in the host, the descriptors
    workers PUT (after handling what they sent) and the refusals, by reason."""
    result: dict[str, object] = {}
    if _hub is not None:
        with _hub.lock:
            for channel in [c for cs in _hub.channels.values() for c in cs]:
                channel.pump(None, answer=False)
            result["worker_fds"] = len(_hub.fds)
            result["refused"] = dict(_hub.refused)
    return {"fds_held": _memfd.held(), "mapped": mapped(), "leased": leased(), "cached": cached(),
            "pinned": pinned(), **pool.stats(), **result}
