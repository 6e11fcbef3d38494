"""The serving side of one actor: a CALL in, its method run where it belongs, one answer out.

A CALL names a public method of the actor's root object, or a callable it exported (a
reference, of which only the call itself is reachable), and the call chain it belongs to.
Coroutine methods and async generators run as a task on the actor's loop, plain methods in
its thread pool; a call whose chain started on another of this process's loops runs on that
loop. Each CALL gets exactly one answer: RESULT (a value, or "stream" followed by ITEMs) or
ERROR, also when it is cancelled before it started; the answer's header acknowledges the
shared memory the CALL carried.

Each sender may have at most ``max_in_flight`` calls open here (from receipt to answer),
the same cap its own side keeps, so an honest caller never meets the refusal; a caller that
ignores it gets QueueFullError for the excess, and the actor's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyisolate.broker.protocol import Kind

from .._wire import DecodeError, encode_exception
from .._wire import shm as _shm
from ..errors import ProtocolError, QueueFullError
from .dispatch import ASYNC, GEN, PLAIN, call_fields, handle_methods, kind_of, resolve_method
from .flow import Acks
from .pool import Job, Pool
from .refs import HandleProxy, RefProxy
from .streams import Streams
from .values import Values

if TYPE_CHECKING:
    from .tracing import Tracing

__all__ = ["CHAIN", "Server"]

#: The call chain the current task or thread serves: (actor that started it, chain id).
CHAIN: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("pyisolate_chain", default=None)

#: Sends ``[header, body, *buffers]`` to an actor, never raising for a departed one.
SendQuiet = Callable[[bytes, list[Any]], None]

_CREATED = inspect.CORO_CREATED


class Server:
    """Runs the calls other actors make on this one, and answers each exactly once."""

    def __init__(self, name: bytes, origin: str, loop: asyncio.AbstractEventLoop, send_quiet: SendQuiet,
                 values: Values, acks: Acks, chain_loops: dict[int, asyncio.AbstractEventLoop],
                 max_in_flight: int) -> None:
        self.name = name
        self._origin = origin
        self._loop = loop
        self._send_quiet = send_quiet
        self._values = values
        self._acks = acks
        self._chain_loops = chain_loops
        self.max_in_flight = max_in_flight
        self.streams: Streams  # set by the Endpoint, which builds both
        self._root: object = None
        self._methods: dict[str, tuple[Callable[..., Any], int]] = {}
        self._serving: dict[tuple[bytes, int], asyncio.Task[Any] | concurrent.futures.Future[Any] | Job] = {}
        self._elsewhere: set[tuple[bytes, int]] = set()  # served on another loop of this process
        self._open: dict[bytes, int] = {}  # calls open per sender, from receipt to answer
        self._idle: asyncio.Event | None = None  # while someone waits in idle(): set when none is open
        self.refused = 0
        #: In a worker: what a SystemExit raised by a served method does instead of being answered
        #: (``workers.exits.leave``: the process exits with its code). None: answered like any error.
        self.on_system_exit: Callable[[SystemExit], None] | None = None
        self._pool = Pool(name.decode())
        #: Spans of the calls served (``tracing.Tracing``); None: tracing is off, nothing is done.
        self.tracing: Tracing | None = None

    @property
    def root(self) -> object:
        """The object whose public methods this actor serves (ref 0); None for none."""
        return self._root

    @root.setter
    def root(self, value: object) -> None:
        self._root = value
        self._methods = {}  # bound methods of the old root

    def open_calls(self, sender: bytes | None = None) -> int:
        """Calls being served: from ``sender``, or from everyone."""
        return self._open.get(sender, 0) if sender is not None else sum(self._open.values())

    async def idle(self, timeout: float) -> bool:
        """Wait until no call is open, at most ``timeout`` seconds; say whether none is."""
        try:
            async with asyncio.timeout(timeout):
                while self._open:
                    self._idle = asyncio.Event()
                    await self._idle.wait()
        except TimeoutError:
            return False
        finally:
            self._idle = None
        return True

    # -- in --------------------------------------------------------------------------------

    def on_call(self, sender: bytes, call_id: int, extra: list[object], body: bytes, buffers: list[bytes]) -> None:
        """CALL: check it, decode it, and start its method."""
        key = (sender, call_id)
        open_now = self._open.get(sender, 0)
        acked: object = None
        trace: object = None
        try:
            if len(extra) > 4:  # releases riding with the call (after its body, which may name them), a trace
                if len(extra) == 6:
                    trace = extra.pop()  # read only where tracing is on, and then validated
                acked = extra.pop()
                if acked is not None and not isinstance(acked, list):
                    raise ProtocolError("a CALL header's fifth field must be a list of segment names")
            if key in self._serving:
                raise ProtocolError(f"call id {call_id} of {sender.decode()!r} is already being served")
            if open_now >= self.max_in_flight:
                self.refused += 1
                raise QueueFullError(
                    f"actor {self.name.decode()!r} already serves {open_now} calls from {sender.decode()!r}, "
                    f"the most one caller may have open (max_in_flight={self.max_in_flight}); a caller "
                    "must wait for answers before it calls again")
            method, ref_id, chain_owner, chain_id = call_fields(extra)
            fn, kind, loop = self._target(method, ref_id, sender)
            args = self._values.decode(body, buffers, sender)
            if not (type(args) is list and len(args) == 2 and type(args[0]) is list
                    and type(args[1]) is dict and all(type(k) is str for k in args[1])):
                raise DecodeError("call body must be [args, kwargs]")
        except Exception as exc:
            if self.tracing is not None:  # its SERVER span says why, like a call that ran
                method = extra[0] if extra and type(extra[0]) is str else ""
                ref = extra[1] if len(extra) > 1 and type(extra[1]) is int else 0
                self.tracing.refused(key, self.name, method, ref, trace, exc)
            self.send_error(sender, call_id, exc)  # refused before it counted
            return
        finally:
            if isinstance(acked, list):
                _shm.unpin(sender, acked)
        self._open[sender] = open_now + 1
        chain = (chain_owner, chain_id)
        if loop is None and chain_owner == self._origin:
            loop = self._chain_loops.get(chain_id)
        if self.tracing is not None:  # the method runs in its SERVER span's context (copied from here)
            token = self.tracing.serve(key, self.name, method, ref_id, trace)
            try:
                self._start(sender, call_id, key, fn, kind, loop, args, chain)
            finally:
                self.tracing.detach(token)
            return
        self._start(sender, call_id, key, fn, kind, loop, args, chain)

    def _start(self, sender: bytes, call_id: int, key: tuple[bytes, int], fn: Callable[..., Any], kind: int,
               loop: asyncio.AbstractEventLoop | None, args: list[Any], chain: tuple[str, int]) -> None:
        """Run a checked CALL: a task on this loop, a job in the pool, or a task on ``loop``."""
        if loop is None or loop is self._loop:
            if kind == PLAIN:  # straight to the thread pool; the thread hands the result back
                context = contextvars.copy_context()
                context.run(CHAIN.set, chain)
                a, kw = args
                self._serving[key] = self._pool.submit(
                    lambda: self._run_plain(sender, call_id, context, fn, a, kw))
            else:
                self._serving[key] = self._loop.create_task(
                    self._serve(sender, call_id, fn, kind, args[0], args[1], chain))
            return
        invoke = self._invoke(fn, kind, args[0], args[1], chain)
        try:
            future = asyncio.run_coroutine_threadsafe(invoke, loop)
        except RuntimeError as exc:  # that loop is closed
            invoke.close()
            self.reply_error(sender, call_id, exc)
            return
        self._serving[key] = future
        self._elsewhere.add(key)
        future.add_done_callback(
            lambda f: self._loop.call_soon_threadsafe(self._reply_future, sender, call_id, f)
        )

    def on_cancel(self, sender: bytes, call_id: int) -> None:
        """CANCEL: the caller gave up; stop the work, and answer if it never started."""
        key = (sender, call_id)
        served = self._serving.get(key)
        if served is None:  # answered already
            return
        if key in self._elsewhere:  # on another loop: its done-callback answers
            served.cancel()
            return
        if isinstance(served, asyncio.Task):
            unstarted = inspect.getcoroutinestate(served.get_coro()) == _CREATED  # type: ignore[arg-type]
            served.cancel()  # a started one answers from its except clause
        else:  # a Job in the pool
            unstarted = served.cancel()  # a running thread cannot be interrupted: it answers when done
        if unstarted:  # its code never runs, so nothing else answers it
            del self._serving[key]
            self.reply_error(sender, call_id, asyncio.CancelledError())

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
        export = self._values.exports.get(ref_id)
        if export is None or sender not in export.counts:  # released, or never given to this caller
            raise LookupError(f"reference {ref_id} of {self.name.decode()!r} is not held by {sender.decode()!r}")
        if export.handle:
            entry = export.methods.get(method)
            if entry is None:
                entry = export.methods[method] = self._handle_method(export.obj, method)
            return entry[0], entry[1], export.loop
        if method:
            raise AttributeError(f"reference {ref_id} of {self.name.decode()!r} is a callable: only calling "
                                 f"it is allowed, not its attribute {method!r}")
        target: Callable[..., Any] = export.obj  # type: ignore[assignment]
        if isinstance(target, RefProxy):  # forwarded: its owner runs it, we wait on our loop
            proxy = target

            async def forward(*args: Any, **kwargs: Any) -> Any:
                return await proxy(*args, **kwargs)
            return forward, ASYNC, None
        return target, kind_of(target), export.loop

    def _handle_method(self, obj: object, method: str) -> tuple[Callable[..., Any], int]:
        """The method ``method`` of a handle's object, if the handle reaches it."""
        if isinstance(obj, HandleProxy):  # a forwarded handle: its owner serves the call
            if method not in obj._pyisolate_methods:
                raise AttributeError(f"{obj._pyisolate_type!r} handle has no public method {method!r}")
            call, owner, ref_id = obj._pyisolate_call, obj._pyisolate_owner, obj._pyisolate_ref

            async def forward(*args: Any, **kwargs: Any) -> Any:
                return await call(owner, method, args, kwargs, ref_id)
            return forward, ASYNC
        cls: Any = type(obj)
        if method not in handle_methods(cls):
            raise AttributeError(f"a handle to a {type(obj).__qualname__} object reaches only its public methods, "
                                 f"and {method!r} is not one")
        fn = resolve_method(obj, method)
        return fn, kind_of(fn)

    # -- running ---------------------------------------------------------------------------

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
        result = await self._pool.run(fn, *args, **kwargs)
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
            traceback.clear_frames(exc.__traceback__)
        # Let go of the arguments before the answer is queued: shared memory they hold is
        # released now, and the release rides with the answer.
        args.clear()
        kwargs.clear()
        try:
            self._loop.call_soon_threadsafe(self._plain_done, sender, call_id, context, result, error)
        except RuntimeError:  # the loop is closed: the worker is going away
            pass

    def _plain_done(self, sender: bytes, call_id: int, context: contextvars.Context, result: object,
                    error: BaseException | None) -> None:
        key = (sender, call_id)
        if error is None and inspect.isawaitable(result):  # a plain method that returned a coroutine
            self._serving[key] = self._loop.create_task(
                self._serve(sender, call_id, lambda: result, ASYNC, [], {}, context.run(CHAIN.get) or ("", 0)))
            return
        self._serving.pop(key, None)
        if error is not None:
            self.reply_error(sender, call_id, error)
        else:
            self._reply(sender, call_id, result)

    async def _serve(self, sender: bytes, call_id: int, fn: Callable[..., Any], kind: int, args: list[Any],
                     kwargs: dict[str, Any], chain: tuple[str, int]) -> None:
        """Run one call on this actor's loop (a task of its own) and answer it."""
        CHAIN.set(chain)  # the task runs in a copy of the context: nothing to reset
        try:
            if kind == ASYNC:
                result = await fn(*args, **kwargs)
            elif kind == GEN:
                result = fn(*args, **kwargs)
            else:
                result = await self._in_thread(fn, args, kwargs)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)
            args.clear()
            kwargs.clear()
            self._serving.pop((sender, call_id), None)
            self.reply_error(sender, call_id, exc)
            if not isinstance(exc, Exception):
                raise
            return
        args.clear()  # as in _run_plain: what they share is released with the answer
        kwargs.clear()
        self._serving.pop((sender, call_id), None)
        self._reply(sender, call_id, result)

    # -- out -------------------------------------------------------------------------------

    def _reply_future(self, sender: bytes, call_id: int, future: concurrent.futures.Future[Any]) -> None:
        self._serving.pop((sender, call_id), None)
        self._elsewhere.discard((sender, call_id))
        if future.cancelled():
            self.reply_error(sender, call_id, asyncio.CancelledError())
        elif (exc := future.exception()) is not None:
            self.reply_error(sender, call_id, exc)
        else:
            self._reply(sender, call_id, future.result())

    def _reply(self, sender: bytes, call_id: int, result: object) -> None:
        if inspect.isasyncgen(result):
            self._closed(sender)
            if self.tracing is not None:  # the call's span ends as its stream begins
                self.tracing.served((sender, call_id))
            self.streams.start(sender, call_id, result)
            return
        try:
            body, buffers = self._values.encode(sender, result, None, "result")
        except Exception as exc:
            self.reply_error(sender, call_id, exc)
            return
        self._closed(sender)
        if self.tracing is not None:
            self.tracing.served((sender, call_id))
        self._send_quiet(sender, [self._acks.answer_header(Kind.RESULT, sender, call_id), body, *buffers])

    def reply_error(self, sender: bytes, call_id: int, exc: BaseException) -> None:
        """Answer ``sender``'s open call ``call_id`` with ``exc``."""
        self._closed(sender)
        if self.tracing is not None:
            self.tracing.served((sender, call_id), exc)
        self.send_error(sender, call_id, exc)

    def send_error(self, sender: bytes, call_id: int, exc: BaseException) -> None:
        """Send ERROR ``exc`` for ``call_id`` (a refused call, or a stream that broke)."""
        if isinstance(exc, SystemExit) and self.on_system_exit is not None:
            self.on_system_exit(exc)  # every outcome of a method passes here
            return
        body, buffers = encode_exception(exc)
        self._send_quiet(sender, [self._acks.answer_header(Kind.ERROR, sender, call_id), body, *buffers])

    def _closed(self, sender: bytes) -> None:
        """One call of ``sender`` is answered (or was refused before it counted)."""
        n = self._open.get(sender, 0)
        if n > 1:
            self._open[sender] = n - 1
        elif n == 1:
            del self._open[sender]
            if self._idle is not None and not self._open:
                self._idle.set()

    def drop_peer(self, peer: bytes) -> None:
        """``peer`` is gone: what runs for it runs on, but is not counted against anyone."""
        self._open.pop(peer, None)
        if self._idle is not None and not self._open:
            self._idle.set()

    async def aclose(self) -> None:
        """Cancel what is still being served and release the thread pool; idempotent."""
        tasks = [t for t in self._serving.values() if isinstance(t, asyncio.Task)]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.close()
        if self.tracing is not None:
            self.tracing.close()
