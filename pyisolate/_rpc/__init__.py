"""One actor's calls: the Endpoint and the parts it is made of (see ``endpoint``), the
proxies that stand for remote objects, and the blocking views of them.

- ``endpoint``: ``Endpoint`` composes ``values`` (the codec with references), ``calls`` (the
  calls this actor makes), ``serve`` (the calls made on it), ``streams`` (generators) and
  ``flow`` (slots and acknowledgements); ``dispatch`` holds the rules of what is callable.
- ``refs``: exported objects and the proxies (``ActorProxy``, ``RefProxy``, ``HandleProxy``) that call them;
  ``remote``: the awaitable of one remote call and of a remote stream.
- ``stats``: ``CallStats``, the counters of the calls one actor makes to another (the host's,
  per extension);
- ``context``: the worker process's own endpoint; ``blocking``: ``pyisolate.sync()``; ``pool``: the
  threads that run plain methods.
- ``tracing``: OpenTelemetry spans of calls and the trace context in CALL headers (imported only
  where tracing is on: ``make_tracing``); ``spans``: the SPANS message a worker ships them in.

The rest of pyisolate uses what this module names.
"""

from __future__ import annotations

from typing import Any

from .blocking import Blocking, block, sync
from .context import set_worker_endpoint, worker_endpoint
from .dispatch import public_methods, resolve_method
from .endpoint import Endpoint
from .refs import ActorProxy, HandleProxy, RefProxy
from .remote import RemoteCall
from .spans import span_bodies, span_record, unpack_spans
from .stats import CallStats

__all__ = [
    "ActorProxy", "Blocking", "CallStats", "Endpoint", "HandleProxy", "RefProxy", "RemoteCall", "block",
    "make_tracing", "public_methods", "resolve_method", "set_worker_endpoint", "span_bodies", "span_record", "sync",
    "unpack_spans", "worker_endpoint",
]  # fmt: skip


def make_tracing(tracer: Any) -> Any:
    """A ``tracing.Tracing`` of calls for an OpenTelemetry ``tracer`` (an Endpoint's ``tracing``).

    Imports OpenTelemetry, an optional dependency: called only where tracing is on.
    """
    from .tracing import Tracing

    return Tracing(tracer)
