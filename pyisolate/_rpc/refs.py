"""References: callables and actors that travel by name, and run where they were defined.

An endpoint *exports* a callable when it sends one: the object stays in an export table under
a ref id, and the message carries ``(owner actor, ref id, flags)``. The receiver gets a
``RefProxy``; calling it sends a CALL back to the owner. Lifetime is by counting messages:
the owner counts, per receiving actor, how many messages carried the reference; the receiver
counts how many it received; when its proxy is garbage-collected it sends RELEASE with that
count, and the owner forgets the object once every receiver has released what it received.
A receiver that dies releases everything it held.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .remote import RemoteCall

__all__ = ["ActorProxy", "ExportTable", "RefProxy", "FLAG_ACTOR", "FLAG_ASYNC"]

FLAG_ASYNC = 1  # the callable is a coroutine function
FLAG_ACTOR = 2  # the reference names a whole actor (ref id 0), not an exported object

#: How a proxy calls: (owner, method, args, kwargs, ref_id) -> awaitable result.
Caller = Callable[..., Any]  # (owner, method, args, kwargs, ref_id, timeout=None) -> awaitable


@dataclass(eq=False)
class _Export:
    obj: object
    loop: asyncio.AbstractEventLoop | None
    counts: dict[bytes, int] = field(default_factory=dict)


class ExportTable:
    """Objects this actor has sent as references, with per-receiver message counts."""

    def __init__(self) -> None:
        self._by_id: dict[int, _Export] = {}
        self._ids: dict[int, int] = {}  # id(obj) -> ref id; the export keeps obj alive
        self._next = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, obj: object, receiver: bytes, loop: asyncio.AbstractEventLoop | None) -> int:
        """Count one more message carrying ``obj`` to ``receiver``; return its ref id."""
        ref_id = self._ids.get(id(obj))
        if ref_id is None:
            self._next += 1
            ref_id = self._next
            self._by_id[ref_id] = _Export(obj, loop)
            self._ids[id(obj)] = ref_id
        counts = self._by_id[ref_id].counts
        counts[receiver] = counts.get(receiver, 0) + 1
        return ref_id

    def get(self, ref_id: int) -> _Export | None:
        """The export with ``ref_id``, if it is still held."""
        return self._by_id.get(ref_id)

    def release(self, ref_id: int, receiver: bytes, count: int) -> None:
        """``receiver`` dropped ``count`` received copies of ``ref_id``."""
        export = self._by_id.get(ref_id)
        if export is None:
            return
        left = export.counts.get(receiver, 0) - count
        if left > 0:
            export.counts[receiver] = left
        else:
            export.counts.pop(receiver, None)
            if not export.counts:
                del self._by_id[ref_id]
                del self._ids[id(export.obj)]

    def drop_receiver(self, receiver: bytes) -> None:
        """``receiver`` is gone: release everything it held."""
        for ref_id, export in list(self._by_id.items()):
            if receiver in export.counts:
                self.release(ref_id, receiver, export.counts[receiver])


def is_async_callable(obj: object) -> bool:
    """Whether calling ``obj`` gives a coroutine."""
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(getattr(type(obj), "__call__", None))  # noqa: B004


class RefProxy:
    """A callable that lives in another actor. Calling it returns an awaitable of the result."""

    __slots__ = ("_pyisolate_owner", "_pyisolate_ref", "_pyisolate_flags", "_pyisolate_call",
                 "_pyisolate_cell", "__weakref__")

    def __init__(self, owner: bytes, ref_id: int, flags: int, call: Caller, cell: list[int]) -> None:
        self._pyisolate_owner = owner
        self._pyisolate_ref = ref_id
        self._pyisolate_flags = flags
        self._pyisolate_call = call
        self._pyisolate_cell = cell  # [messages received]; read by the release finalizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pyisolate_call(self._pyisolate_owner, "", args, kwargs, self._pyisolate_ref)

    def __repr__(self) -> str:
        return f"<remote callable {self._pyisolate_ref} of actor {self._pyisolate_owner.decode()!r}>"


class _ActorMethod:
    __slots__ = ("_call", "_owner", "_name")

    def __init__(self, call: Caller, owner: bytes, name: str) -> None:
        self._call, self._owner, self._name = call, owner, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return RemoteCall(lambda timeout: self._call(self._owner, self._name, args, kwargs, 0, timeout))

    def __repr__(self) -> str:
        return f"<remote method {self._name!r} of actor {self._owner.decode()!r}>"


class ActorProxy:
    """A handle to an actor by name: its public methods are attributes returning awaitables."""

    def __init__(self, name: bytes, call: Caller) -> None:
        self._pyisolate_owner = name
        self._pyisolate_call = call

    def __getattr__(self, name: str) -> _ActorMethod:
        if name.startswith("_"):
            raise AttributeError(f"{name!r}: only public methods of an actor can be called")
        method = _ActorMethod(self._pyisolate_call, self._pyisolate_owner, name)
        self.__dict__[name] = method
        return method

    def __repr__(self) -> str:
        return f"<actor {self._pyisolate_owner.decode()!r}>"
