"""OpenTelemetry traces through real workers: spans, their parents, one trace id, errors, and
what a hostile worker's trace fields and span messages do (nothing but be counted)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from shared_api import DatabaseAPI, SlowService
from trace_api import Relay

import pyisolate
from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig
from pyisolate._rpc.spans import pack_spans
from tests.support import ext

# The process's one global provider (OpenTelemetry allows setting it once): an SDK provider
# exporting into memory. Other tests do not trace, so they add nothing to it.
EXPORTER = InMemorySpanExporter()
if not isinstance(trace.get_tracer_provider(), TracerProvider):
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(_provider)
TRACER = trace.get_tracer("tests")


@pytest.fixture
async def traced(venv_root, tmp_path):
    config = ExtensionManagerConfig(venv_root_path=venv_root, tracing=True,
                                    sandbox={"writable_paths": [tmp_path]})
    async with ExtensionManager(ExtensionBase, config) as manager:
        EXPORTER.clear()
        yield manager
    Relay().peer = None


async def load(manager, name: str, module: str = "actors"):
    async with asyncio.timeout(120):
        return await manager.load_extension(ExtensionConfig(name=name, module_path=ext(module),
                                                            apis=[DatabaseAPI, SlowService, Relay]))


def spans_by_name():
    found = {}
    for span in EXPORTER.get_finished_spans():
        found.setdefault((span.name, span.kind), []).append(span)
    return found


def one(found, name, kind):
    spans = found.get((name, kind), [])
    assert len(spans) == 1, f"{name} {kind}: {spans} in {sorted(found)}"
    return spans[0]


async def test_one_trace_from_the_host_through_a_singleton_to_another_extension(traced):
    a, b = await load(traced, "a"), await load(traced, "b")
    Relay().peer = traced.get_actor("b")
    EXPORTER.clear()
    with TRACER.start_as_current_span("request") as root:
        assert await a.call_actor("Relay", "forward", "echo", 42) == 42
    # The workers' spans went to the host before their answers: all are here once it returns.
    found = spans_by_name()
    chain = [
        one(found, "request", SpanKind.INTERNAL),
        one(found, "a/call_actor", SpanKind.CLIENT),  # the host calls a
        one(found, "a/call_actor", SpanKind.SERVER),  # in worker a
        one(found, "Relay/forward", SpanKind.CLIENT),  # a calls the singleton
        one(found, "Relay/forward", SpanKind.SERVER),  # in the host
        one(found, "b/echo", SpanKind.CLIENT),  # the singleton calls b
        one(found, "b/echo", SpanKind.SERVER),  # in worker b
    ]
    assert len(EXPORTER.get_finished_spans()) == len(chain)
    assert chain[0].context.span_id == root.get_span_context().span_id
    for parent, child in zip(chain, chain[1:]):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id, (child.name, parent.name)
    assert {span.context.trace_id for span in chain} == {root.get_span_context().trace_id}
    # Where each span was made: the workers' carry their actor and pid; the host's do not.
    pids = {"a": await a.pid(), "b": await b.pid()}
    for span in (chain[2], chain[3]):
        assert span.resource.attributes["pyisolate.actor"] == "a"
        assert span.resource.attributes["process.pid"] == pids["a"]
    assert chain[6].resource.attributes["pyisolate.actor"] == "b"
    assert "pyisolate.actor" not in chain[4].resource.attributes
    assert chain[4].attributes["pyisolate.caller"] == "a"  # stamped by the broker
    assert chain[2].attributes["rpc.method"] == "call_actor" and chain[2].attributes["rpc.system"] == "pyisolate"
    assert all(span.status.status_code is StatusCode.UNSET for span in chain)
    # Traced calls are counted as any other: the host's call to a, with its bytes.
    counted = pyisolate.stats(a)
    assert counted["methods"]["call_actor"]["calls"] == 1 and counted["bytes_out"] > 0


async def test_extension_to_extension_and_callbacks_are_spans_of_the_same_trace(traced):
    a, _ = await load(traced, "a"), await load(traced, "b")
    EXPORTER.clear()

    def plus_one(x):
        return x + 1

    with TRACER.start_as_current_span("request") as root:
        assert await a.call_actor("b", "echo", "x") == "x"  # through the broker, host untouched
        assert await a.call_back(plus_one, 1) == 2  # a calls back into the host
    found = spans_by_name()
    server_b = one(found, "b/echo", SpanKind.SERVER)
    client_a = one(found, "b/echo", SpanKind.CLIENT)
    assert client_a.resource.attributes["pyisolate.actor"] == "a"
    assert server_b.parent.span_id == client_a.context.span_id
    assert client_a.parent.span_id == one(found, "a/call_actor", SpanKind.SERVER).context.span_id
    callback = one(found, "host/<callable>", SpanKind.SERVER)
    assert callback.parent.span_id == one(found, "host/<callable>", SpanKind.CLIENT).context.span_id
    assert one(found, "host/<callable>", SpanKind.CLIENT).parent.span_id == \
        one(found, "a/call_back", SpanKind.SERVER).context.span_id
    assert {span.context.trace_id for span in EXPORTER.get_finished_spans()} == {root.get_span_context().trace_id}


async def test_a_failed_call_marks_its_spans_failed_on_both_sides(traced):
    a, _ = await load(traced, "a"), await load(traced, "b")
    EXPORTER.clear()
    with pytest.raises(TypeError, match="not callable"):
        await a.call_actor("b", "call_back", 1)  # b runs `await 1()`
    found = spans_by_name()
    for name, kind in [("a/call_actor", SpanKind.CLIENT), ("a/call_actor", SpanKind.SERVER),
                       ("b/call_back", SpanKind.CLIENT), ("b/call_back", SpanKind.SERVER)]:
        span = one(found, name, kind)
        assert span.status.status_code is StatusCode.ERROR, (name, kind)
        assert "TypeError" in span.status.description
        assert span.attributes["error.type"] == "builtins.TypeError"
        assert any(event.name == "exception" for event in span.events)
    failed_in_b = one(found, "b/call_back", SpanKind.SERVER)
    assert failed_in_b.resource.attributes["pyisolate.actor"] == "b"
    assert "await fn(*args)" in next(e for e in failed_in_b.events if e.name == "exception"
                                     ).attributes["exception.stacktrace"]  # b's own traceback


async def test_hostile_trace_fields_and_span_messages_are_ignored(traced):
    bad = await load(traced, "hostile", "hostile")
    Relay().peer = None
    good = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    hostile_fields = [
        "not a traceparent", "00-" + "0" * 32 + "-" + "cd" * 8 + "-01", good[:-1], good + "x" * 2000,
        ["00-" + "ab" * 16 + "-" + "cd" * 8 + "-01", "k=" + "v" * 4000], ["a", "b", "c"], {"traceparent": good},
        12345, b"\x00" * 55, [good, 7],
    ]
    # Each malformed field: the call runs all the same, untraced by the peer, as a root span.
    before = traced._singletons[b"Relay"].tracing.ignored
    for field in hostile_fields:
        EXPORTER.clear()
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'echo'"):  # it ran
            await bad.call_traced_by_hand("Relay", "forward", None, field, "echo")
        server = one(spans_by_name(), "Relay/forward", SpanKind.SERVER)
        assert server.parent is None
    assert traced._singletons[b"Relay"].tracing.ignored == before + len(hostile_fields)
    # A well-formed one is honoured: the hostile worker may only name a parent, nothing else.
    EXPORTER.clear()
    with pytest.raises(AttributeError):
        await bad.call_traced_by_hand("Relay", "forward", [], good, "echo")
    server = one(spans_by_name(), "Relay/forward", SpanKind.SERVER)
    assert server.parent.span_id == 0xCDCDCDCDCDCDCDCD and server.context.trace_id == int("ab" * 16, 16)
    # A call refused before it runs (no such method) has its SERVER span too, failed, in the trace.
    EXPORTER.clear()
    with pytest.raises(AttributeError):
        await bad.call_traced_by_hand("Relay", "no_such_method", [], good, "echo")
    refused = one(spans_by_name(), "Relay/no_such_method", SpanKind.SERVER)
    assert refused.parent.span_id == 0xCDCDCDCDCDCDCDCD and refused.status.status_code is StatusCode.ERROR
    # SPANS bodies that are garbage, oversized or malformed record by record are refused and counted.
    traces = traced.traces
    refused = traces.refused
    record = [b"\x01" * 16, b"\x02" * 8, None, False, "forged", 1, 5, 10, 0, None, {}, [], "x"]
    bodies = [b"\xc1", b"\x00" * 100, pack_spans([record[:5]]), pack_spans([[*record[:7], 4, *record[8:]]]),
              pack_spans([[b"\x00" * 16, *record[1:]]]), pack_spans([record] * 300),
              pack_spans([[*record[:10], {"k": {"nested": 1}}, *record[11:]]])]
    EXPORTER.clear()
    for body in bodies:
        assert await bad.send_spans(body) is True
    assert await bad.send_spans(pack_spans([record])) is True  # one well-formed span, from the hostile actor
    assert await bad.echo(1) == 1  # its messages are processed in order: all of the above were
    assert traces.refused == refused + len(bodies)
    forged = [span for span in EXPORTER.get_finished_spans() if span.name == "forged"]
    assert len(forged) == 1 and forged[0].resource.attributes["pyisolate.actor"] == "hostile"


def test_tracing_without_opentelemetry_says_what_to_install(tmp_path):
    """A host without OpenTelemetry (hidden from this interpreter) is told the extra to install."""
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from pyisolate import ConfigError, ExtensionBase, ExtensionManager, ExtensionManagerConfig\n"
        f"ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path={str(tmp_path)!r}))  # off: fine\n"
        "try:\n"
        f"    ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path={str(tmp_path)!r}, tracing=True))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'pyisolate[otel]'" in done.stdout


async def test_an_in_process_extension_call_is_a_span_current_while_it_runs(traced):
    local = await traced.load_extension(ExtensionConfig(name="local", module_path=ext("actors"), isolated=False,
                                                        apis=[DatabaseAPI, SlowService, Relay]))

    async def inner(x):
        with TRACER.start_as_current_span("inner"):
            return x * 2

    EXPORTER.clear()
    with TRACER.start_as_current_span("request") as root:
        assert await local.call_back(inner, 21) == 42
    found = spans_by_name()
    call = one(found, "local/call_back", SpanKind.INTERNAL)
    assert call.parent.span_id == root.get_span_context().span_id
    assert one(found, "inner", SpanKind.INTERNAL).parent.span_id == call.context.span_id  # made while it ran
    assert call.attributes["rpc.method"] == "call_back"
