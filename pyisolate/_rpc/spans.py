"""The body of a SPANS message: finished spans a worker hands to the host to export.

A worker has no exporter of its own (a sandboxed one has no network): its spans travel to the
host over the bus, and the host gives them to its own TracerProvider's span processors. The
body is plain msgpack (no extension types), an array of at most ``MAX_SPANS`` records::

    [trace_id: bin 16, span_id: bin 8, parent_id: bin 8 | nil, parent_is_remote: bool,
     name: str, kind: int 0-4, start_ns: int, end_ns: int, status: int 0-2,
     description: str | nil, attributes: {str: value}, events: [[name, time_ns, attributes]],
     scope: str]

An attribute value is a bool, int, float or str, or a list of at most ``MAX_LIST`` of them.
The host refuses, record by record, anything of another shape or past these bounds (the
worker trims its spans to them first, so honest spans always pass). Only finished spans
travel; this module knows nothing of OpenTelemetry and is shared by both sides.
"""

from __future__ import annotations

from typing import Any

import msgpack

__all__ = ["MAX_SPANS", "Record", "fit", "pack_spans", "span_bodies", "span_record", "unpack_spans"]

#: Spans per SPANS message.
MAX_SPANS = 256
#: Characters of a span, event or scope name, and of an attribute key.
MAX_NAME = 256
#: Characters of an attribute value or a status description (an exception's stack fits).
MAX_TEXT = 8192
#: Attributes per span or event; events per span; items of a list value.
MAX_ATTRIBUTES = 64
MAX_EVENTS = 16
MAX_LIST = 64
#: Bytes of one SPANS body: what the bounds above allow, with room to spare.
MAX_BODY = 4 << 20

_TIME = 1 << 63

#: One decoded record, in the order of the fields above.
Record = tuple[bytes, bytes, bytes | None, bool, str, int, int, int, int, str | None,
               dict[str, Any], list[tuple[str, int, dict[str, Any]]], str]


def _scalar(value: object) -> object:
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, (bool, int, float)):
        return value
    return str(value)[:MAX_TEXT]


def fit(attributes: Any) -> dict[str, Any]:
    """``attributes`` (a span's or event's, or None) trimmed to the bounds a record must keep."""
    fitted: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if len(fitted) == MAX_ATTRIBUTES:
            break
        if isinstance(value, (list, tuple)):
            fitted[str(key)[:MAX_NAME]] = [_scalar(item) for item in value[:MAX_LIST]]
        else:
            fitted[str(key)[:MAX_NAME]] = _scalar(value)
    return fitted


def span_record(span: Any) -> list[Any]:
    """A finished OpenTelemetry SDK span (a ``ReadableSpan``) as a record, trimmed to the bounds."""
    context, parent, status = span.context, span.parent, span.status
    events = [[event.name[:MAX_NAME] or "event", event.timestamp, fit(event.attributes)]
              for event in list(span.events)[:MAX_EVENTS]]
    scope = span.instrumentation_scope
    return [
        context.trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big"),
        parent.span_id.to_bytes(8, "big") if parent is not None and parent.is_valid else None,
        bool(parent is not None and parent.is_remote),
        span.name[:MAX_NAME] or "span", int(span.kind.value), span.start_time, span.end_time,
        int(status.status_code.value), status.description[:MAX_TEXT] if status.description else None,
        fit(span.attributes), events, (scope.name if scope is not None else "")[:MAX_NAME] or "unknown",
    ]


def pack_spans(records: list[list[Any]]) -> bytes:
    """The body of one SPANS message (at most MAX_SPANS records)."""
    body: bytes = msgpack.packb(records, use_bin_type=True)
    return body


def span_bodies(records: list[list[Any]]) -> list[bytes]:
    """The bodies of the SPANS messages that carry ``records``."""
    return [pack_spans(records[i:i + MAX_SPANS]) for i in range(0, len(records), MAX_SPANS)]


def _value_ok(value: object) -> bool:
    if type(value) is str:
        return len(value) <= MAX_TEXT
    if type(value) is int:
        return -_TIME <= value < _TIME
    if type(value) is bool or type(value) is float:
        return True
    if type(value) is list:
        return len(value) <= MAX_LIST and all(
            type(item) in (bool, int, float, str) and _value_ok(item) for item in value)
    return False


def _attributes_ok(attributes: object) -> bool:
    return (type(attributes) is dict and len(attributes) <= MAX_ATTRIBUTES
            and all(type(k) is str and len(k) <= MAX_NAME and _value_ok(v) for k, v in attributes.items()))


def _name_ok(name: object) -> bool:
    return type(name) is str and 0 < len(name) <= MAX_NAME


def _time_ok(value: object) -> bool:
    return type(value) is int and 0 <= value < _TIME


def _record(item: object) -> Record | None:
    """A record if ``item`` is one, in every field and bound; else None."""
    match item:
        case [bytes() as trace_id, bytes() as span_id, parent, bool() as remote, name, int() as kind,
              int() as start, int() as end, int() as status, description, attributes, list() as events, scope]:
            pass
        case _:
            return None
    if (len(trace_id) != 16 or len(span_id) != 8 or not any(trace_id) or not any(span_id)
            or not (parent is None or (type(parent) is bytes and len(parent) == 8 and any(parent)))
            or not _name_ok(name) or not 0 <= kind <= 4 or not _time_ok(start) or not _time_ok(end)
            or end < start or not 0 <= status <= 2 or not _attributes_ok(attributes)
            or not (description is None or (type(description) is str and len(description) <= MAX_TEXT))
            or len(events) > MAX_EVENTS or not _name_ok(scope)):
        return None
    checked: list[tuple[str, int, dict[str, Any]]] = []
    for event in events:
        match event:
            case [event_name, event_time, event_attributes] if (
                    _name_ok(event_name) and _time_ok(event_time) and _attributes_ok(event_attributes)):
                checked.append((event_name, event_time, event_attributes))
            case _:
                return None
    return (trace_id, span_id, parent, remote, name, kind, start, end, status, description,  # type: ignore[return-value]
            attributes, checked, scope)


def unpack_spans(body: bytes) -> tuple[list[Record], int]:
    """The well-formed records of a SPANS body from another process, and how many were refused.

    Never raises: a body that is not msgpack, too large, or not an array of at most MAX_SPANS
    items is refused whole (counted as one).
    """
    if len(body) > MAX_BODY:
        return [], 1
    try:
        # msgpack bounds every length by the body's own; no extension type is ever expected.
        items = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True, max_ext_len=0)
    except Exception:  # msgpack raises several unrelated types on garbage
        return [], 1
    if type(items) is not list or len(items) > MAX_SPANS:
        return [], 1
    records = [_record(item) for item in items]
    good = [record for record in records if record is not None]
    return good, len(records) - len(good)
