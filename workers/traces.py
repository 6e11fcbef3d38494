"""Tracing in a worker: an OpenTelemetry SDK provider whose finished spans go to the host.

Set up at boot when the host traces (``ExtensionManagerConfig(tracing=True)``). The worker
imports OpenTelemetry's API and SDK from the host's own files (the runtime directory links
them when tracing is on), or from its venv where the extension depends on them. It exports
nothing itself: no network, no collector address, nothing that a sandbox would have to allow.
Its spans, the pyisolate calls' and the extension's own (the provider is the process's global
one), travel to the host in SPANS messages, where the host's TracerProvider exports them.

Spans are shipped at the end of the loop turn in which they ended, and at once when a served
call's span ends, before its answer leaves: the host has a call's spans by the time its caller
has the answer. At most ``MAX_PENDING`` spans wait; past that they are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from pyisolate.broker.protocol import HOST, Kind, pack_header

from pyisolate._rpc import span_bodies, span_record

__all__ = ["MAX_PENDING", "install"]

logger = logging.getLogger("pyisolate.workers")

#: Finished spans waiting to be shipped; more are dropped (counted) until the next shipment.
MAX_PENDING = 4096

#: Sends ``[header, body]`` to an actor (the worker connection's send).
Send = Callable[[bytes, list[Any]], None]


class _Shipper:
    """Finished spans, kept until the loop sends them to the host."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send) -> None:
        self._loop = loop
        self._send = send
        self._thread = threading.get_ident()  # the loop's: the connection is used there only
        self._lock = threading.Lock()
        self._pending: list[list[Any]] = []
        self.dropped = 0

    def on_end(self, span: Any) -> None:
        """A span ended (in any thread): keep it for the next shipment."""
        if not span.context.trace_flags.sampled:
            return
        record = span_record(span)
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self._pending.append(record)
            first = len(self._pending) == 1
        if first:
            try:
                if threading.get_ident() == self._thread:
                    self._loop.call_soon(self.ship)
                else:
                    self._loop.call_soon_threadsafe(self.ship)
            except RuntimeError:  # the loop is closed: the worker is going away
                pass

    def ship(self) -> None:
        """On the loop: send what is pending to the host."""
        with self._lock:
            batch, self._pending = self._pending, []
        for body in span_bodies(batch) if batch else ():
            try:
                self._send(HOST, [pack_header(Kind.SPANS), body])
            except Exception as exc:  # the host does not read (QueueFullError), or it is gone
                self.dropped += 1
                logger.debug("spans not sent to the host: %s", exc)


def install(loop: asyncio.AbstractEventLoop, send: Send) -> Any:
    """Make an SDK TracerProvider shipping to the host the process's own; return a tracer for
    pyisolate's call spans and the shipper (its ``ship`` sends what is pending), or None where
    OpenTelemetry cannot be imported (the worker then serves untraced, and says so)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    except ImportError as exc:
        logger.warning("the host traces calls, but this worker cannot import OpenTelemetry's SDK (%s): "
                       "its calls are not traced", exc)
        return None
    shipper = _Shipper(loop, send)

    class ToHost(SpanProcessor):
        def on_end(self, span: Any) -> None:
            shipper.on_end(span)

        def shutdown(self) -> None:
            shipper.ship()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            shipper.ship()
            return True

    provider = TracerProvider(resource=Resource.get_empty())
    provider.add_span_processor(ToHost())
    trace.set_tracer_provider(provider)  # the extension's own spans join its calls' traces
    return provider.get_tracer("pyisolate"), shipper
