"""The receive cache: mappings of other actors' pooled segments, kept mapped once unused.

A segment of a sender's pool comes again and again (its id says so: ``p`` before the token).
Keeping the mapping once our last view of it died means the next receipt maps nothing and
faults nothing in. Bounded: ``count`` mappings and ``nbytes`` bytes (the pool's bound), the
oldest evicted first; those of an actor that went away are unmapped at once.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

__all__ = ["ReceiveCache"]


class _Cached(Protocol):
    inode: tuple[int, int]
    size: int
    cached: bool


_Mapping = TypeVar("_Mapping", bound=_Cached)


class ReceiveCache(Generic[_Mapping]):
    """Unleased received mappings by inode, oldest first (used under the segments' lock)."""

    def __init__(self, count: int = 32, nbytes: int = 512 << 20) -> None:
        self.count = count
        self.nbytes = nbytes
        self.entries: dict[tuple[int, int], _Mapping] = {}

    def keep(self, mapping: _Mapping) -> list[_Mapping]:
        """Keep ``mapping`` (its lease died); return what to unmap: the oldest past the bounds."""
        self.entries.pop(mapping.inode, None)
        self.entries[mapping.inode] = mapping
        total = sum(m.size for m in self.entries.values())
        evicted: list[_Mapping] = []
        while self.entries and (len(self.entries) > self.count or total > self.nbytes):
            old = self.entries.pop(next(iter(self.entries)))
            total -= old.size
            old.cached = False
            evicted.append(old)
        return evicted

    def take(self, mapping: _Mapping) -> None:
        """``mapping`` is leased again: out of the cache while it is used."""
        self.entries.pop(mapping.inode, None)

    def remove(self, mappings: list[_Mapping]) -> list[_Mapping]:
        """Take these out (those still in it), to be unmapped; return them."""
        gone = [m for m in mappings if self.entries.get(m.inode) is m]
        for mapping in gone:
            del self.entries[mapping.inode]
            mapping.cached = False
        return gone

    def __len__(self) -> int:
        return len(self.entries)
