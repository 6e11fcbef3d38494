"""Serve calls on an extension object: each CALL gets exactly one RESULT or ERROR."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pyisolate._base import LIFECYCLE_HOOKS, ExtensionBase
from pyisolate._codec import DecodeError, decode, encode, encode_exception
from pyisolate.broker.protocol import Kind, pack_header, unpack_header

__all__ = ["Server", "public_methods", "resolve_method"]

logger = logging.getLogger("pyisolate.workers")

Send = Callable[[Sequence[Any]], None]


def public_methods(instance: object) -> list[str]:
    """Names of the methods of ``instance`` that may be called remotely."""
    return sorted(
        name
        for name in dir(type(instance))
        if not name.startswith("_") and name not in LIFECYCLE_HOOKS and callable(getattr(type(instance), name))
    )


def resolve_method(instance: object, name: object) -> Callable[..., Any]:
    """The bound method ``name`` of ``instance`` if it may be called remotely.

    Raises:
        AttributeError: private, lifecycle, missing or not a method.
    """
    if not isinstance(name, str) or not name or name.startswith("_") or name in LIFECYCLE_HOOKS:
        raise AttributeError(f"{name!r} cannot be called remotely: only public methods can")
    attr = getattr(type(instance), name, None)
    if attr is None or not callable(attr):
        raise AttributeError(f"{type(instance).__name__!r} has no public method {name!r}")
    method: Callable[..., Any] = getattr(instance, name)
    return method


class Server:
    """Dispatch messages for one extension instance; one task per call."""

    def __init__(self, instance: ExtensionBase, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        self._instance = instance
        self._send = send
        self._loop = loop
        self._methods: dict[str, tuple[Callable[..., Any], bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Our own pool, so that a stuck plain method cannot hold up the process's exit.
        self._executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="pyisolate-call")
        self.stopping = asyncio.Event()
        #: Set once stop() has run and its answer is queued.
        self.finished = asyncio.Event()
        self.dropped = 0

    def on_message(self, frames: list[bytes]) -> None:
        """Handle ``[sender, header, body, *buffers]`` from the broker."""
        if len(frames) < 3:
            self._drop("short message")
            return
        sender = frames[0]
        try:
            kind, call_id, extra = unpack_header(frames[1])
        except ValueError as exc:
            self._drop(str(exc))
            return
        match kind:
            case Kind.CALL:
                self._on_call(sender, call_id, extra, frames[2], frames[3:])
            case Kind.STOP:
                self._on_stop(sender, call_id)
            case Kind.UNROUTABLE:
                logger.debug("a reply could not be delivered: %s", extra)
            case _:
                self._drop(f"unexpected {kind.name}")

    def _on_call(self, sender: bytes, call_id: int, extra: list[object], body: bytes, buffers: list[bytes]) -> None:
        name = extra[0] if extra else None
        try:
            entry = self._methods.get(name) if isinstance(name, str) else None
            if entry is None:
                method = resolve_method(self._instance, name)
                entry = (method, inspect.iscoroutinefunction(method))
                self._methods[name] = entry  # type: ignore[index]
            args = decode(body, buffers)
            if not (isinstance(args, list) and len(args) == 2 and isinstance(args[0], list)
                    and isinstance(args[1], dict) and all(isinstance(k, str) for k in args[1])):
                raise DecodeError("call body must be [args, kwargs]")
        except Exception as exc:
            self._reply_error(sender, call_id, exc)
            return
        task = self._loop.create_task(self._run(sender, call_id, entry[0], entry[1], args[0], args[1]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, sender: bytes, call_id: int, method: Callable[..., Any], is_async: bool,
        args: list[Any], kwargs: dict[str, Any],
    ) -> None:
        try:
            if is_async:
                result = await method(*args, **kwargs)
            else:
                result = await self._loop.run_in_executor(self._executor, functools.partial(method, *args, **kwargs))
                if inspect.isawaitable(result):
                    result = await result
        except BaseException as exc:
            self._reply_error(sender, call_id, exc)
            if not isinstance(exc, Exception):
                raise
            return
        try:
            body, buffers = encode(result)
        except Exception as exc:
            self._reply_error(sender, call_id, exc)
            return
        self._send([sender, pack_header(Kind.RESULT, call_id), body, *buffers])

    def _reply_error(self, sender: bytes, call_id: int, exc: BaseException) -> None:
        body, buffers = encode_exception(exc)
        self._send([sender, pack_header(Kind.ERROR, call_id), body, *buffers])

    def _on_stop(self, sender: bytes, call_id: int) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        task = self._loop.create_task(self._stop(sender, call_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop(self, sender: bytes, call_id: int) -> None:
        try:
            result = self._instance.stop()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            logger.exception("stop() of the extension failed")
            self._reply_error(sender, call_id, exc)
        else:
            self._send([sender, pack_header(Kind.RESULT, call_id), *encode(None)[:1]])
        self.finished.set()

    async def drain(self) -> None:
        """Cancel calls still running (the extension is going away) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        logger.debug("dropped a message: %s", why)
