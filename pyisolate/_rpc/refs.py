"""References: callables and actors that travel by name, and run where they were defined.

An endpoint *exports* a callable when it sends one: the object stays in an export table under
a ref id, and the message carries ``(owner actor, ref id, flags)``. The receiver gets a
``RefProxy``; calling it sends a CALL back to the owner. Lifetime is by counting messages:
the owner counts, per receiving actor, how many messages carried the reference; the receiver
counts how many it received; when its proxy is garbage-collected it sends RELEASE with that
count, and the owner forgets the object once every receiver has released what it received.
A receiver that dies releases everything it held.

A *handle* (``pyisolate.handle``, or a type registered by reference) is an exported object of
which only its public methods are reachable; its reference also carries the object's type name
and method names, so the receiver's ``HandleProxy`` knows them without asking. A proxy sent on
to an actor other than its owner is exported again by the actor that sends it (a forwarding
reference): the new receiver's calls go through that actor, which keeps its own proxy, and so
the object, alive for as long as the new receiver holds it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .remote import RemoteCall

__all__ = ["ActorProxy", "ExportTable", "HandleProxy", "RefProxy", "FLAG_ACTOR", "FLAG_ASYNC", "FLAG_OBJECT"]

FLAG_ASYNC = 1  # the callable is a coroutine function
FLAG_ACTOR = 2  # the reference names a whole actor (ref id 0), not an exported object
FLAG_OBJECT = 4  # a handle: an object whose public methods are reachable, not a callable

#: How a proxy calls: (owner, method, args, kwargs, ref_id) -> awaitable result.
Caller = Callable[..., Any]  # (owner, method, args, kwargs, ref_id, timeout=None) -> awaitable


@dataclass(eq=False)
class _Export:
    obj: object
    loop: asyncio.AbstractEventLoop | None
    handle: bool = False  # an object whose methods are called, not a callable
    counts: dict[bytes, int] = field(default_factory=dict)
    #: A handle's methods as called so far: name -> (callable, how to run it).
    methods: dict[str, tuple[Callable[..., Any], int]] = field(default_factory=dict)


class ExportTable:
    """Objects this actor has sent as references, with per-receiver message counts."""

    def __init__(self) -> None:
        self._by_id: dict[int, _Export] = {}
        self._ids: dict[tuple[int, bool], int] = {}  # (id(obj), handle) -> ref id; the export keeps obj alive
        self._next = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, obj: object, receiver: bytes, loop: asyncio.AbstractEventLoop | None, handle: bool = False) -> int:
        """Count one more message carrying ``obj`` (as a callable, or as a handle) to ``receiver``;
        return its ref id."""
        ref_id = self._ids.get((id(obj), handle))
        if ref_id is None:
            self._next += 1
            ref_id = self._next
            self._by_id[ref_id] = _Export(obj, loop, handle)
            self._ids[(id(obj), handle)] = ref_id
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
                del self._ids[(id(export.obj), export.handle)]

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


class HandleProxy:
    """An object that lives in another actor: its public methods, and nothing else, are reachable.

    ``proxy.method(...)`` returns an awaitable of the result in async code; in plain code (a
    thread without a running event loop, such as a worker's plain method) it blocks and returns
    the result itself, so code written for the local object runs unchanged.
    """

    __slots__ = ("_pyisolate_owner", "_pyisolate_ref", "_pyisolate_flags", "_pyisolate_call",
                 "_pyisolate_cell", "_pyisolate_type", "_pyisolate_methods", "_pyisolate_bound", "__weakref__")

    def __init__(self, owner: bytes, ref_id: int, flags: int, call: Caller, cell: list[int], type_name: str,
                 methods: frozenset[str]) -> None:
        self._pyisolate_owner = owner
        self._pyisolate_ref = ref_id
        self._pyisolate_flags = flags
        self._pyisolate_call = call
        self._pyisolate_cell = cell  # [messages received]; read by the release finalizer
        self._pyisolate_type = type_name
        self._pyisolate_methods = methods
        self._pyisolate_bound: dict[str, _HandleMethod] = {}

    def __getattr__(self, name: str) -> _HandleMethod:
        method = self._pyisolate_bound.get(name)
        if method is not None:
            return method
        if name not in self._pyisolate_methods:
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)  # protocols Python probes for (__len__, __array__, ...)
            raise AttributeError(
                f"{name!r}: a handle to a {self._pyisolate_type} object reaches only its public methods "
                f"({', '.join(sorted(self._pyisolate_methods)) or 'it has none'}); its attributes stay where it "
                "lives: add a method that returns what you need")
        method = self._pyisolate_bound[name] = _HandleMethod(self, name)
        return method

    def __dir__(self) -> list[str]:
        return sorted(self._pyisolate_methods)

    def __repr__(self) -> str:
        return f"<handle {self._pyisolate_ref} to a {self._pyisolate_type} object of actor " \
               f"{self._pyisolate_owner.decode()!r}>"


class _HandleMethod:
    __slots__ = ("_proxy", "_name")

    def __init__(self, proxy: HandleProxy, name: str) -> None:
        self._proxy, self._name = proxy, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy, name = self._proxy, self._name
        call, owner, ref_id = proxy._pyisolate_call, proxy._pyisolate_owner, proxy._pyisolate_ref
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # plain code: block until the answer comes, on the endpoint's loop
            loop: asyncio.AbstractEventLoop = call.__self__.loop  # type: ignore[attr-defined]
            if not loop.is_running():
                raise RuntimeError(f"{proxy!r}.{name}() from plain code blocks until the event loop that serves the "
                                   "handle answers, but that loop is not running; call it from async code") from None

            async def run() -> Any:
                return await call(owner, name, args, kwargs, ref_id)
            return asyncio.run_coroutine_threadsafe(run(), loop).result()
        return RemoteCall(lambda timeout: call(owner, name, args, kwargs, ref_id, timeout))

    def __repr__(self) -> str:
        return f"<remote method {self._name!r} of {self._proxy!r}>"


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
