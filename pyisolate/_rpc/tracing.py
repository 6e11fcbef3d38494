"""OpenTelemetry spans of one actor's calls, and the trace context a CALL header carries.

Imported only where tracing is on (``ExtensionManagerConfig(tracing=True)``): it imports
OpenTelemetry, which is an optional dependency (``pip install 'pyisolate[otel]'``). With
tracing off an Endpoint's ``tracing`` is None, its CALL headers are byte for byte those of a
pyisolate without tracing, and no code of this module runs.

Each call makes two spans: a CLIENT span where it is made (a child of whatever span is current
there) and a SERVER span where it runs, a child of the client span, current while the method
runs, so that the calls it makes, and the extension's own spans, are its children. The client
span's W3C trace context travels as the CALL header's sixth field (see ``wire_field``). A
receiver never trusts that field: anything but the exact shape it expects is ignored (counted
in ``Tracing.ignored``), and the call runs as the root of a trace of its own.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["MAX_TRACESTATE", "TRACEPARENT_LENGTH", "Tracing", "parent_context", "wire_field"]

#: A W3C ``traceparent`` of version 00: ``00-<32 hex>-<16 hex>-<2 hex>``.
TRACEPARENT_LENGTH = 55
#: The longest ``tracestate`` carried (W3C: 32 members; vendors keep it well under this).
MAX_TRACESTATE = 512

_log = logging.getLogger("pyisolate.tracing")
_PROPAGATOR = TraceContextTextMapPropagator()
_EMPTY = Context()


def wire_field(context: Context) -> str | list[str] | None:
    """The CALL header field for ``context``'s span: its ``traceparent``, or ``[traceparent,
    tracestate]`` when it has a trace state; None when the span has no valid context (no SDK)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    parent = carrier.get("traceparent")
    if parent is None:
        return None
    state = carrier.get("tracestate")
    return [parent, state] if state else parent


def parent_context(field: object) -> Context | None:
    """The trace context a peer's CALL header field names, or None for anything malformed.

    The field comes from another process: only a ``traceparent`` string of exactly the version
    00 length, optionally with a bounded ``tracestate`` string, is read, by OpenTelemetry's own
    W3C parser; a context that parser rejects (bad hex, zero ids, a bad version) is None too.
    """
    if type(field) is str:
        parent, state = field, None
    elif type(field) is list and len(field) == 2 and type(field[0]) is str and type(field[1]) is str:
        parent, state = field
        if len(state) > MAX_TRACESTATE:
            return None
    else:
        return None
    if len(parent) != TRACEPARENT_LENGTH:
        return None
    carrier = {"traceparent": parent} if state is None else {"traceparent": parent, "tracestate": state}
    context = _PROPAGATOR.extract(carrier, context=_EMPTY)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def _span_name(actor: str, method: str, ref_id: int) -> str:
    return f"{actor}/{method or ('<callable>' if ref_id else '<call>')}"


def _attributes(actor: str, method: str, ref_id: int) -> dict[str, Any]:
    attributes: dict[str, Any] = {"rpc.system": "pyisolate", "rpc.service": actor, "rpc.method": method}
    if ref_id:
        attributes["pyisolate.ref_id"] = ref_id
    return attributes


def _fail(span: Span, exc: BaseException) -> None:
    span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:1024])
    span.set_attribute("error.type", f"{type(exc).__module__}.{type(exc).__qualname__}")
    span.record_exception(exc)


class Tracing:
    """The spans of one actor's calls: a CLIENT span per call it makes, a SERVER span per call
    it serves (open from receipt to answer)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._served: dict[tuple[bytes, int], Span] = {}
        #: Trace context fields from peers that were malformed and ignored.
        self.ignored = 0
        #: Served calls whose span could not be started (the tracer raised).
        self.failed = 0
        #: Called once a served call's span ended, before its answer leaves (a worker ships
        #: its finished spans then, so the host has them by the time the caller has its answer).
        self.on_served: Callable[[], None] | None = None

    # -- the calling side ------------------------------------------------------------------

    def client(self, target: bytes, method: str, ref_id: int) -> tuple[Span, str | list[str] | None]:
        """Start the CLIENT span of a call (a child of the current span) and its header field."""
        actor = target.decode(errors="replace")
        span = self._tracer.start_span(_span_name(actor, method, ref_id), kind=SpanKind.CLIENT,
                                       attributes=_attributes(actor, method, ref_id))
        return span, wire_field(trace.set_span_in_context(span))

    def local(self, actor: str, method: str) -> Any:
        """A span for a call served in this process (an ``isolated=False`` extension), current
        while the method runs: a context manager; an exception marks it failed."""
        return self._tracer.start_as_current_span(_span_name(actor, method, 0), kind=SpanKind.INTERNAL,
                                                  attributes=_attributes(actor, method, 0))

    @staticmethod
    def end(span: Span, exc: BaseException | None = None) -> None:
        """End a CLIENT span; an exception marks it failed."""
        if exc is not None:
            _fail(span, exc)
        span.end()

    # -- the serving side ------------------------------------------------------------------

    def serve(self, key: tuple[bytes, int], actor: bytes, method: str, ref_id: int,
              field: object) -> contextvars.Token[Context] | None:
        """Start the SERVER span of call ``key`` and make it current until ``detach(token)``:
        whatever starts the method meanwhile (a task, a pool job) runs in a copy of this context.

        A tracer that raises (an application's sampler or span processor) costs the call its
        span, never its answer: None, logged once (``failed`` counts them).
        """
        try:
            return self._serve(key, actor, method, ref_id, field)
        except Exception:
            self.failed += 1
            if self.failed == 1:
                _log.exception("starting a span failed; calls run on without one")
            return None

    def _serve(self, key: tuple[bytes, int], actor: bytes, method: str, ref_id: int,
               field: object) -> contextvars.Token[Context]:
        parent = None
        if field is not None:
            parent = parent_context(field)
            if parent is None:
                self.ignored += 1
        name = actor.decode(errors="replace")
        attributes = _attributes(name, method, ref_id)
        attributes["pyisolate.caller"] = key[0].decode(errors="replace")  # stamped by the broker
        span = self._tracer.start_span(_span_name(name, method, ref_id), context=parent or _EMPTY,
                                       kind=SpanKind.SERVER, attributes=attributes)
        self._served[key] = span
        return otel_context.attach(trace.set_span_in_context(span))

    def refused(self, key: tuple[bytes, int], actor: bytes, method: str, ref_id: int, field: object,
                exc: BaseException) -> None:
        """Call ``key`` was refused before it ran (an unknown method, too many open, an undecodable
        body): a SERVER span that ends at once, failed with ``exc``."""
        if key in self._served:  # a second call under the id of one running: that one keeps its span
            return
        token = self.serve(key, actor, method, ref_id, field)
        self.detach(token)
        self.served(key, exc)

    @staticmethod
    def detach(token: contextvars.Token[Context] | None) -> None:
        """Make current again what was before ``serve``."""
        if token is not None:
            otel_context.detach(token)

    def served(self, key: tuple[bytes, int], exc: BaseException | None = None) -> None:
        """Call ``key`` is answered (``exc``: with that error): end its SERVER span."""
        span = self._served.pop(key, None)
        if span is None:
            return
        if exc is not None:
            _fail(span, exc)
        span.end()
        if self.on_served is not None:
            self.on_served()

    def close(self) -> None:
        """End the spans of calls still open (the actor is closing)."""
        spans, self._served = list(self._served.values()), {}
        for span in spans:
            span.end()
