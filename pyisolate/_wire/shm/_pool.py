"""A bounded pool of this process's segments in size classes, reused once no other actor holds them.

A fresh tensor or array that moves to shared memory takes a free segment of its size class:
already mapped and faulted in, so the move is a warm copy, with no segment to make, fault in
and tear down. Classes are a quarter of a power of two apart (a class wastes at most a
quarter of it), from ``MIN_CLASS`` up; smaller values, and values past the pool's bound, get a
segment of their own as before.

A segment goes back to the pool when its lease dies (``_segments``): when no value here uses
it and every receiver has released it (a receiver releases when its own last view dies, not
when it maps the segment). It is reused only for the actor that saw it already (its ``peer``)
or for one it trusts (a worker's host), never for another: a receiver may keep a mapping
after releasing, so memory once seen by A never carries what is meant for B. A segment seen
by two actors, or released as shared on (``!``), or whose receiver went away, is unmapped.

Bound: the bytes of all pooled segments (in use or free) stay within ``limit`` (the
``shm_pool_bytes`` setting, ``PYISOLATE_SHM_POOL``; at most a quarter of the cgroup's memory
limit). A segment that does not fit evicts the oldest free ones, or else the value gets a
segment of its own (or travels as a copy where none can be had): the pool never fails a send.
"""

from __future__ import annotations

import os
import re

from . import _segments
from ._memfd import NoRoom
from ._segments import Segment, _Mapping

__all__ = ["MIN_CLASS", "bound", "class_of", "configure", "parse_size", "pool", "take"]

#: The smallest size class; smaller values get segments of their own (their setup costs little,
#: and a pool of small segments would spend descriptors, of which each process has a budget).
MIN_CLASS = 64 << 10
#: Default bound of the pool's bytes.
DEFAULT_LIMIT = 512 << 20
_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``"512M"``, ``"2GiB"``, ``"1048576"`` (``ValueError`` naming the form otherwise)."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: write bytes, or a number with K, M, G or T (e.g. 512M)")
    return int(match[1]) << (10 * " kmgt".index((match[2] or " ").lower()))


def class_of(size: int) -> int:
    """The size class of a value of ``size`` bytes: a quarter-step of a power of two, whole pages."""
    step = max(1 << max((size - 1).bit_length() - 3, 0), os.sysconf("SC_PAGE_SIZE"))
    return -(-size // step) * step


def _cgroup_memory() -> int | None:
    """This process's cgroup memory limit (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``), if any."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return None
    for parts in lines:
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            path = f"/sys/fs/cgroup{parts[2]}/memory.max"
        elif "memory" in parts[1].split(","):
            path = f"/sys/fs/cgroup/memory{parts[2]}/memory.limit_in_bytes"
        else:
            continue
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        # v1 says "no limit" with a huge number (the largest page-aligned long)
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


class Pool:
    """Free segments by recency, and the bytes of every pooled segment (free or in use)."""

    def __init__(self) -> None:
        self.limit = DEFAULT_LIMIT
        self.total = 0
        self.free: list[_Mapping] = []  # oldest first
        self.hits = 0  # values that took a free segment
        self.made = 0  # pooled segments made
        self.outside = 0  # values that did not fit the pool (a segment of their own)

    def take(self, size: int, dest: bytes | None) -> Segment | None:
        """A lease of a free pooled segment for ``size`` bytes going to ``dest`` (None: no actor yet).

        None where the pool cannot serve it (too small, past the bound, no memory): the caller
        makes a segment of its own.
        """
        if size < MIN_CLASS:
            return None
        cls = class_of(size)
        evicted: list[_Mapping] = []
        with _segments._lock:
            for i in range(len(self.free) - 1, -1, -1):  # the most recently used first: warmest
                mapping = self.free[i]
                if mapping.size == cls and (mapping.peer is None or mapping.peer == dest
                                            or mapping.peer in _segments.state.trusted):
                    del self.free[i]
                    self.hits += 1
                    return _segments.lease(mapping)
            while self.free and self.total + cls > self.limit:
                evicted.append(self.free.pop(0))
                self.total -= evicted[-1].size
            fits = self.total + cls <= self.limit
            if fits:
                self.total += cls  # reserved while it is made
            else:
                self.outside += 1
        for mapping in evicted:
            _segments.unmap(mapping)
        if not fits:
            return None
        try:
            segment = _segments.create(cls, pooled=True)
        except NoRoom:
            with _segments._lock:
                self.total -= cls
                self.outside += 1
            return None
        with _segments._lock:
            self.made += 1
        return segment

    def give_back(self, mapping: _Mapping) -> bool:
        """Take back a pooled mapping whose lease died (lock held); False: unmap it."""
        if mapping.tainted or self.total > self.limit:
            self.total -= mapping.size
            return False
        self.free.append(mapping)
        return True

    def trim(self) -> None:
        """Unmap every free segment (those in use come back, and are kept, as they are released)."""
        with _segments._lock:
            free, self.free = self.free, []
            self.total -= sum(m.size for m in free)
        for mapping in free:
            _segments.unmap(mapping)

    def stats(self) -> dict[str, int]:
        with _segments._lock:
            free = sum(m.size for m in self.free)
            return {"pool_limit": self.limit, "pool_bytes": self.total, "pool_free_bytes": free,
                    "pool_hits": self.hits, "pool_made": self.made, "pool_outside": self.outside}


pool = Pool()
_segments.give_back = pool.give_back


def bound(limit: int | None = None) -> tuple[int, str]:
    """The pool's bound in bytes for the setting ``limit``, and where it comes from, in words.

    None: ``PYISOLATE_SHM_POOL``, else the default. At most a quarter of this process's cgroup
    memory limit, so that a small container keeps room for everything else. 0: no pool.

    Raises:
        ValueError: ``PYISOLATE_SHM_POOL`` is not a size, or the bound is negative.
    """
    source = "shm_pool_bytes"
    if limit is None:
        text = os.environ.get("PYISOLATE_SHM_POOL")
        limit, source = (parse_size(text), "PYISOLATE_SHM_POOL") if text else (DEFAULT_LIMIT, "the default")
    if limit < 0:
        raise ValueError(f"the shared-memory pool's bound must be 0 or more bytes, not {limit}")
    cgroup = _cgroup_memory()
    if cgroup is not None and cgroup // 4 < limit:
        return cgroup // 4, f"a quarter of the cgroup's memory limit ({source} asks {limit})"
    return limit, source


def configure(limit: int | None) -> int:
    """Set the pool's bound in bytes (see ``bound``); return it."""
    limit = bound(limit)[0]
    evicted: list[_Mapping] = []
    with _segments._lock:
        pool.limit = limit
        _segments.cache.nbytes = limit
        while pool.free and pool.total > limit:
            evicted.append(pool.free.pop(0))
            pool.total -= evicted[-1].size
    for mapping in evicted:
        _segments.unmap(mapping)
    return limit


def take(size: int, dest: bytes | None) -> Segment | None:
    """``pool.take``: a pooled segment for ``size`` bytes going to ``dest``, or None."""
    return pool.take(size, dest) if pool.limit else None
