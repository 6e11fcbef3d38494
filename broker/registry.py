"""Actor names <-> ZeroMQ routing ids, and who may join. Pure logic: no sockets, no clock."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

__all__ = ["Admission", "Registry"]


@dataclass(frozen=True)
class Admission:
    """The outcome of a join request: ``ok`` or the reason it was refused."""

    ok: bool
    reason: str = ""


class Registry:
    """Remote actors (workers) by name and by routing id, and the names expected to join.

    A name joins only if the manager announced it with ``expect`` and the joiner proves
    it holds that launch's secret; a name that is connected cannot be taken again. A name
    expected as remote joins only through the CURVE listener (whose key the broker has
    checked against the name), and a local one only through the ipc socket.
    """

    def __init__(self) -> None:
        self._by_name: dict[bytes, bytes] = {}
        self._by_rid: dict[bytes, bytes] = {}
        self._expected: dict[bytes, bytes] = {}
        self._remote: set[bytes] = set()  # expected names that join through the listener

    def expect(self, name: bytes, secret: bytes, *, remote: bool = False) -> None:
        """Allow ``name`` to join once, with ``secret`` (``remote``: through the listener, no secret)."""
        self._expected[name] = secret
        if remote:
            self._remote.add(name)
        else:
            self._remote.discard(name)

    def admit(self, rid: bytes, name: bytes, secret: bytes, *, remote: bool = False) -> Admission:
        """Bind ``rid`` to ``name`` if the join is legitimate."""
        if rid in self._by_rid:
            return Admission(False, "this connection has already joined")
        if name in self._by_name:
            return Admission(False, f"the name {name.decode(errors='replace')!r} is taken")
        expected = self._expected.get(name)
        if expected is None:
            return Admission(False, f"no extension named {name.decode(errors='replace')!r} is starting")
        if remote != (name in self._remote):
            where = "a remote worker (through the tcp listener)" if name in self._remote else "a local worker"
            return Admission(False, f"{name.decode(errors='replace')!r} may join only as {where}")
        if not remote and not hmac.compare_digest(expected, secret):
            return Admission(False, "wrong launch secret")
        del self._expected[name]
        self._remote.discard(name)
        self._by_name[name] = rid
        self._by_rid[rid] = name
        return Admission(True)

    def forget(self, name: bytes) -> None:
        """Remove ``name`` (connected or expected); idempotent."""
        self._expected.pop(name, None)
        self._remote.discard(name)
        rid = self._by_name.pop(name, None)
        if rid is not None:
            self._by_rid.pop(rid, None)

    def knows(self, name: bytes) -> bool:
        """Whether ``name`` is connected or expected to join."""
        return name in self._by_name or name in self._expected

    def name_of(self, rid: bytes) -> bytes | None:
        """The actor name bound to routing id ``rid``, if it joined."""
        return self._by_rid.get(rid)

    def rid_of(self, name: bytes) -> bytes | None:
        """The routing id of the connected actor ``name``."""
        return self._by_name.get(name)
