"""Tracing without processes: the CALL header with tracing off (byte for byte the untraced one),
the trace field's parser against malformed input, and the SPANS body's validation."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, get_current_span

from pyisolate._rpc import Endpoint
from pyisolate._rpc.spans import MAX_SPANS, MAX_TEXT, fit, pack_spans, unpack_spans
from pyisolate._rpc.tracing import Tracing, parent_context
from pyisolate.broker.protocol import Kind, unpack_header

GOOD = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


class Echo:
    def echo(self, value):
        return value


def pair(loop: asyncio.AbstractEventLoop) -> tuple[Endpoint, Endpoint, list[bytes]]:
    """Endpoints ``a`` and ``b`` delivering to each other on ``loop``; the CALL headers a sends."""
    headers: list[bytes] = []
    endpoints: dict[bytes, Endpoint] = {}

    def sender(me: bytes):
        def send(dest: bytes, frames: list) -> None:
            if me == b"a" and unpack_header(frames[0])[0] is Kind.CALL:
                headers.append(bytes(frames[0]))
            loop.call_soon(endpoints[dest].on_frames, me, [bytes(f) for f in frames])
        return send

    endpoints[b"a"] = Endpoint(b"a", loop, sender(b"a"))
    endpoints[b"b"] = Endpoint(b"b", loop, sender(b"b"), root=Echo())
    return endpoints[b"a"], endpoints[b"b"], headers


def sdk_tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("test")), exporter


async def test_the_call_header_is_byte_for_byte_the_untraced_one_with_tracing_off():
    a, b, headers = pair(asyncio.get_running_loop())
    async with asyncio.timeout(10):
        assert await a.call(b"b", "echo", (1,), {}) == 1
    # PROTOCOL_VERSION 3's CALL header: [6, call_id 2, "echo", ref 0, chain owner "a", chain id 1].
    assert headers == [b"\x96\x06\x02\xa4echo\x00\xa1a\x01"]
    # Traced, it carries the client span's traceparent as a sixth field; an untraced receiver
    # never reads it, and answers all the same.
    a.tracing, exporter = sdk_tracing()
    async with asyncio.timeout(10):
        assert await a.call(b"b", "echo", (2,), {}) == 2
    kind, _, extra = unpack_header(headers[1])
    client = exporter.get_finished_spans()[0]
    assert kind is Kind.CALL and extra[:4] == ["echo", 0, "a", 3] and extra[4] is None
    context = client.context
    assert extra[5] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    # Off again: the same bytes as before, with the next ids.
    a.tracing = None
    async with asyncio.timeout(10):
        assert await a.call(b"b", "echo", (3,), {}) == 3
    assert headers[2] == b"\x96\x06\x06\xa4echo\x00\xa1a\x05"
    await a.aclose()
    await b.aclose()


async def test_a_traced_receiver_makes_the_server_span_a_child_of_the_callers():
    a, b, _ = pair(asyncio.get_running_loop())
    a.tracing, exporter = sdk_tracing()
    b.tracing = Tracing(a.tracing._tracer)
    async with asyncio.timeout(10):
        assert await a.call(b"b", "echo", ("x",), {}) == "x"
    server, client = sorted(exporter.get_finished_spans(), key=lambda s: s.kind.value)
    assert (server.kind, client.kind) == (SpanKind.SERVER, SpanKind.CLIENT)
    assert server.parent.span_id == client.context.span_id and server.parent.is_remote
    assert server.attributes["pyisolate.caller"] == "a" and b.tracing.ignored == 0
    await a.aclose()
    await b.aclose()


async def test_a_tracer_that_raises_costs_a_served_call_its_span_not_its_answer():
    class Broken(Sampler):
        def should_sample(self, *args, **kwargs):
            raise RuntimeError("an application's sampler fails")

        def get_description(self):
            return "broken"

    a, b, _ = pair(asyncio.get_running_loop())
    b.tracing = Tracing(TracerProvider(sampler=Broken()).get_tracer("test"))
    async with asyncio.timeout(10):
        assert await a.call(b"b", "echo", ("answered",), {}) == "answered"
    assert b.tracing.failed == 1
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize("field", [
    "", "junk", GOOD[:-1], GOOD + "0", GOOD.upper(), "ff" + GOOD[2:], "00-" + "0" * 32 + GOOD[35:],
    GOOD[:36] + "0" * 16 + GOOD[52:], GOOD.replace("-", "_"), [GOOD], [GOOD, "s", "t"], [GOOD, 1],
    [GOOD, "k=" + "v" * 600], {"traceparent": GOOD}, GOOD.encode(), 7, None, True, [["x"], "y"],
    "00-" + "zz" * 16 + GOOD[35:],
])
def test_a_malformed_trace_field_names_no_parent(field):
    assert parent_context(field) is None


def test_a_well_formed_trace_field_names_its_parent():
    for field in (GOOD, [GOOD, "vendor=opaque"]):
        context = parent_context(field)
        assert context is not None
        span = get_current_span(context).get_span_context()
        assert (span.trace_id, span.span_id, span.is_remote) == (int("ab" * 16, 16), int("cd" * 8, 16), True)


RECORD = [b"\x01" * 16, b"\x02" * 8, b"\x03" * 8, True, "name", 2, 5, 9, 2, "boom", {"k": [1, 2], "s": "v"},
          [["exception", 7, {"exception.type": "E"}]], "scope"]


def test_spans_bodies_keep_well_formed_records_and_count_the_rest():
    assert unpack_spans(pack_spans([RECORD])) == ([tuple(RECORD[:11]) + ([("exception", 7, {"exception.type": "E"})],
                                                                          "scope")], 0)
    bad = [
        RECORD[:12], [*RECORD, "extra"], [b"\x01" * 15, *RECORD[1:]], [*RECORD[:2], b"\x00" * 8, *RECORD[3:]],
        [*RECORD[:4], "", *RECORD[5:]], [*RECORD[:5], 5, *RECORD[6:]], [*RECORD[:6], 10, *RECORD[7:]],
        [*RECORD[:6], -1, *RECORD[7:]], [*RECORD[:8], 3, *RECORD[9:]], [*RECORD[:10], {"k": {"m": 1}}, *RECORD[11:]],
        [*RECORD[:10], {"k": "v" * (MAX_TEXT + 1)}, *RECORD[11:]], [*RECORD[:11], [["e", 1]], RECORD[12]],
        [*RECORD[:11], [["e", 1, {}]] * 17, RECORD[12]], [*RECORD[:12], ""], "not a record", None,
        [*RECORD[:10], {str(i): i for i in range(65)}, *RECORD[11:]], [*RECORD[:3], 1, *RECORD[4:]],
    ]
    good, refused = unpack_spans(pack_spans([RECORD, *bad]))
    assert len(good) == 1 and refused == len(bad)
    for body in (b"", b"\xc1", b"\x91", msgpack.packb({"a": 1}), pack_spans([RECORD] * (MAX_SPANS + 1)),
                 b"\x00" * 10, msgpack.packb([msgpack.ExtType(1, b"x")])):
        assert unpack_spans(body)[0] == [] and unpack_spans(body)[1] >= 1


def test_a_workers_attributes_are_trimmed_to_what_the_host_accepts():
    wild = {f"k{i}": i for i in range(100)} | {"long": "x" * 10**5, "list": list(range(1000)), "odd": object()}
    record = [*RECORD[:10], fit(wild), [], "scope"]
    good, refused = unpack_spans(pack_spans([record]))
    assert refused == 0 and len(good[0][10]) == 64
