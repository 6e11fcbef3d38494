"""The serving half of an Endpoint: a CALL in, its method run where it belongs, one answer out.

A CALL names a public method of the actor's root object, or of an object it exported (a
reference), and the call chain it belongs to. Coroutine methods and async generators run as
a task on the endpoint's loop, plain methods in its thread pool; a call whose chain started
on another of this process's loops runs on that loop. Each CALL gets exactly one answer:
RESULT (a value, or "stream" followed by ITEMs) or ERROR; its header acknowledges the
shared-memory segments the CALL carried.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyisolate.broker.protocol import Kind

from . import _shm
from ._codec import DecodeError, encode_exception
from ._dispatch import ASYNC, GEN, PLAIN, call_fields, kind_of, resolve_method
from ._refs import ExportTable
from .errors import ProtocolError

__all__ = ["CHAIN", "ServeEndpoint"]

#: The call chain the current task or thread serves: (actor that started it, chain id).
CHAIN: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("pyisolate_chain", default=None)


class ServeEndpoint:
    """Mixed into Endpoint, which initialises this state and provides decoding and sending."""

    name: bytes
    loop: asyncio.AbstractEventLoop
    exports: ExportTable
    _root: object
    _methods: dict[str, tuple[Callable[..., Any], int]]
    _origin: str
    _chain_loops: dict[int, asyncio.AbstractEventLoop]
    _executor: concurrent.futures.ThreadPoolExecutor
    _serving: dict[tuple[bytes, int], asyncio.Task[Any] | concurrent.futures.Future[Any]]
    _call_acks: dict[tuple[bytes, int], list[str]]
    #: In a worker: what a SystemExit raised by a served method does instead of being answered
    #: (``workers.exits.leave``: the process exits with its code). None: answered like any error.
    on_system_exit: Callable[[SystemExit], None] | None = None

    if TYPE_CHECKING:
        def _decode(self, body: bytes, buffers: list[bytes], sender: bytes,
                    acks: list[str] | None = None) -> object: ...
        def _encode(self, dest: bytes, value: object, loop: asyncio.AbstractEventLoop | None
                    ) -> tuple[bytes, list[Any]]: ...
        def _send_quiet(self, dest: bytes, frames: list[Any]) -> None: ...
        def _answer_header(self, kind: Kind, sender: bytes, call_id: int, mode: str = "") -> bytes: ...
        def _start_stream(self, peer: bytes, call_id: int, agen: Any) -> None: ...

    def _on_call(self, sender: bytes, call_id: int, extra: list[object], body: bytes, buffers: list[bytes]) -> None:
        acks: list[str] = []
        key = (sender, call_id)
        try:
            if len(extra) == 5:  # acks riding with the call
                acked = extra.pop()
                if not isinstance(acked, list):
                    raise ProtocolError("a CALL header's fifth field must be a list of segment names")
                _shm.unpin(sender, acked)
            method, ref_id, chain_owner, chain_id = call_fields(extra)
            fn, kind, loop = self._target(method, ref_id, sender)
            try:
                args = self._decode(body, buffers, sender, acks)
            finally:
                if acks:
                    self._call_acks[key] = acks
            if not (type(args) is list and len(args) == 2 and type(args[0]) is list
                    and type(args[1]) is dict and all(type(k) is str for k in args[1])):
                raise DecodeError("call body must be [args, kwargs]")
        except Exception as exc:
            self._reply_error(sender, call_id, exc)
            return
        chain = (chain_owner, chain_id)
        if loop is None and chain_owner == self._origin:
            loop = self._chain_loops.get(chain_id)
        if loop is None or loop is self.loop:
            if kind == PLAIN:  # straight to the thread pool; the thread hands the result back
                context = contextvars.copy_context()
                context.run(CHAIN.set, chain)
                self._serving[key] = self._executor.submit(
                    self._run_plain, sender, call_id, context, fn, args[0], args[1])
            else:
                self._serving[key] = self.loop.create_task(
                    self._serve(sender, call_id, fn, kind, args[0], args[1], chain))
            return
        invoke = self._invoke(fn, kind, args[0], args[1], chain)
        try:
            future = asyncio.run_coroutine_threadsafe(invoke, loop)
        except RuntimeError as exc:  # that loop is closed
            invoke.close()
            self._reply_error(sender, call_id, exc)
            return
        self._serving[key] = future
        future.add_done_callback(
            lambda f: self.loop.call_soon_threadsafe(self._reply_future, sender, call_id, f)
        )

    def _target(self, method: str, ref_id: int, sender: bytes
                ) -> tuple[Callable[..., Any], int, asyncio.AbstractEventLoop | None]:
        """The callable a CALL names, how to run it (GEN, ASYNC, PLAIN), and on which loop."""
        if ref_id == 0:
            entry = self._methods.get(method)
            if entry is None:
                if self._root is None:
                    raise AttributeError(f"actor {self.name.decode()!r} has no methods to call")
                fn = resolve_method(self._root, method)
                entry = self._methods[method] = (fn, kind_of(fn))
            return entry[0], entry[1], None
        export = self.exports.get(ref_id)
        if export is None or sender not in export.counts:  # released, or never given to this caller
            raise LookupError(f"reference {ref_id} of {self.name.decode()!r} is not held by {sender.decode()!r}")
        target: Callable[..., Any] = resolve_method(export.obj, method) if method else export.obj  # type: ignore[assignment]
        return target, kind_of(target), export.loop

    async def _invoke(self, fn: Callable[..., Any], kind: int, args: list[Any], kwargs: dict[str, Any],
                      chain: tuple[str, int]) -> Any:
        token = CHAIN.set(chain)
        try:
            if kind == ASYNC:
                return await fn(*args, **kwargs)
            if kind == GEN:
                return fn(*args, **kwargs)
            return await self._in_thread(fn, args, kwargs)
        finally:
            CHAIN.reset(token)

    async def _in_thread(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run a plain callable in the thread pool, with the current context (the chain)."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, functools.partial(context.run, fn, *args, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    def _run_plain(self, sender: bytes, call_id: int, context: contextvars.Context, fn: Callable[..., Any],
                   args: list[Any], kwargs: dict[str, Any]) -> None:
        """In a pool thread: run a plain method and hand its outcome to the loop to answer."""
        try:
            result, error = context.run(fn, *args, **kwargs), None
        except BaseException as exc:  # answered on the loop, like any error
            result, error = None, exc
        try:
            self.loop.call_soon_threadsafe(self._plain_done, sender, call_id, context, result, error)
        except RuntimeError:  # the loop is closed: the worker is going away
            pass

    def _plain_done(self, sender: bytes, call_id: int, context: contextvars.Context, result: object,
                    error: BaseException | None) -> None:
        key = (sender, call_id)
        if error is None and inspect.isawaitable(result):  # a plain method that returned a coroutine
            self._serving[key] = self.loop.create_task(
                self._serve(sender, call_id, lambda: result, ASYNC, [], {}, context.run(CHAIN.get) or ("", 0)))
            return
        self._serving.pop(key, None)
        if error is not None:
            self._reply_error(sender, call_id, error)
        else:
            self._reply(sender, call_id, result)

    async def _serve(self, sender: bytes, call_id: int, fn: Callable[..., Any], kind: int, args: list[Any],
                     kwargs: dict[str, Any], chain: tuple[str, int]) -> None:
        """Run one call on this endpoint's loop (a task of its own) and answer it."""
        CHAIN.set(chain)  # the task runs in a copy of the context: nothing to reset
        try:
            if kind == ASYNC:
                result = await fn(*args, **kwargs)
            elif kind == GEN:
                result = fn(*args, **kwargs)
            else:
                result = await self._in_thread(fn, args, kwargs)
        except BaseException as exc:
            self._serving.pop((sender, call_id), None)
            self._reply_error(sender, call_id, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._serving.pop((sender, call_id), None)
        self._reply(sender, call_id, result)

    def _reply_future(self, sender: bytes, call_id: int, future: concurrent.futures.Future[Any]) -> None:
        self._serving.pop((sender, call_id), None)
        if future.cancelled():
            self._reply_error(sender, call_id, asyncio.CancelledError())
        elif (exc := future.exception()) is not None:
            self._reply_error(sender, call_id, exc)
        else:
            self._reply(sender, call_id, future.result())

    def _reply(self, sender: bytes, call_id: int, result: object) -> None:
        if inspect.isasyncgen(result):
            self._start_stream(sender, call_id, result)
            return
        try:
            body, buffers = self._encode(sender, result, None)
        except Exception as exc:
            self._reply_error(sender, call_id, exc)
            return
        self._send_quiet(sender, [self._answer_header(Kind.RESULT, sender, call_id), body, *buffers])

    def _reply_error(self, sender: bytes, call_id: int, exc: BaseException) -> None:
        if isinstance(exc, SystemExit) and self.on_system_exit is not None:
            self.on_system_exit(exc)  # every outcome of a method passes here
            return
        body, buffers = encode_exception(exc)
        self._send_quiet(sender, [self._answer_header(Kind.ERROR, sender, call_id), body, *buffers])

