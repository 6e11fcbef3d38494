"""Tracing in the host: spans of the host's actors, and the spans workers send, exported here.

With ``ExtensionManagerConfig(tracing=True)`` the host's actors (``host``, each singleton) make
their call spans with the tracer of the process's global TracerProvider, whatever the
application configured (``opentelemetry.trace.set_tracer_provider``), at the time each span
starts. Workers ship their finished spans in SPANS messages (see ``pyisolate._rpc.spans``);
``HostTraces.receive`` validates them and hands them, as SDK ``ReadableSpan``s, to the span
processors of that same provider, with its resource plus ``pyisolate.actor`` (the worker's
name, as the broker stamped it: a worker cannot speak for another) and ``process.pid``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from .._rpc import make_tracing, unpack_spans
from ..errors import ConfigError

__all__ = ["HostTraces", "require_otel"]

logger = logging.getLogger("pyisolate")

_INSTALL = "pip install 'pyisolate[otel]'"


def require_otel() -> None:
    """Raise ConfigError naming the extra to install unless OpenTelemetry's API and SDK are here."""
    try:
        found = importlib.util.find_spec("opentelemetry.trace") and importlib.util.find_spec("opentelemetry.sdk")
    except ImportError:  # no opentelemetry package at all
        found = None
    if not found:
        raise ConfigError("ExtensionManagerConfig(tracing=True) needs OpenTelemetry's API and SDK in the host "
                          f"(the workers use the host's): {_INSTALL}")


class HostTraces:
    """The host's side of tracing: its actors' tracer, and the spans of its workers."""

    def __init__(self) -> None:
        require_otel()
        from opentelemetry import trace

        self._trace = trace
        #: Tracer of the host's actors: a proxy until the application sets its provider.
        self.tracer = trace.get_tracer("pyisolate")
        self._provider: object = None  # the provider the cached sink belongs to
        self._sink: tuple[Any, Any] | None = None  # its span processor and resource
        self._resources: dict[tuple[str, int | None], Any] = {}
        self._warned = False
        self.received = 0  # spans of workers handed to the processors
        self.refused = 0  # malformed records (or whole bodies) from workers

    def tracing(self) -> Any:
        """A ``Tracing`` for one of the host's actors."""
        return make_tracing(self.tracer)

    def _processor(self) -> tuple[Any, Any] | None:
        """The global provider's span processor and resource (an SDK provider's), or None."""
        provider = self._trace.get_tracer_provider()
        if provider is not self._provider:
            self._provider, self._resources = provider, {}
            tracer = provider.get_tracer("pyisolate.workers")
            processor, resource = getattr(tracer, "span_processor", None), getattr(tracer, "resource", None)
            self._sink = (processor, resource) if processor is not None and resource is not None else None
        if self._sink is None and not self._warned:
            self._warned = True
            logger.warning("spans of extension workers are not exported: the host's TracerProvider (%s) is not "
                           "OpenTelemetry's SDK; set one with opentelemetry.trace.set_tracer_provider()",
                           type(provider).__name__)
        return self._sink

    def receive(self, actor: str, pid: int | None, body: bytes) -> None:
        """A SPANS message from worker ``actor``: export its well-formed spans; never raises."""
        records, refused = unpack_spans(body)
        if refused:
            self.refused += refused
            logger.debug("refused %d malformed spans from %r", refused, actor)
        sink = self._processor() if records else None
        if sink is None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        processor, base = sink
        resource = self._resources.get((actor, pid))
        if resource is None:
            if len(self._resources) > 4096:
                self._resources.clear()
            extra: dict[str, Any] = {"pyisolate.actor": actor}
            if pid is not None:
                extra["process.pid"] = pid
            resource = self._resources[(actor, pid)] = base.merge(Resource(extra))
        sampled = TraceFlags(TraceFlags.SAMPLED)
        for (trace_id, span_id, parent_id, remote, name, kind, start, end, status, description, attributes,
             events, scope) in records:
            tid = int.from_bytes(trace_id, "big")
            parent = (SpanContext(tid, int.from_bytes(parent_id, "big"), is_remote=remote, trace_flags=sampled)
                      if parent_id is not None else None)
            span = ReadableSpan(
                name=name, context=SpanContext(tid, int.from_bytes(span_id, "big"), False, sampled), parent=parent,
                resource=resource, attributes=attributes,
                events=[Event(e_name, e_attributes, e_time) for e_name, e_time, e_attributes in events],
                kind=SpanKind(kind), status=Status(StatusCode(status), description if status == 2 else None),
                start_time=start, end_time=end, instrumentation_scope=InstrumentationScope(scope),
            )
            try:
                processor.on_end(span)
            except Exception:  # an exporter's fault must not take the host's loop down
                logger.exception("a span processor failed on a span of %r", actor)
                return
            self.received += 1
