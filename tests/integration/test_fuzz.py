"""Hostile input: random frames at the broker, the host's endpoint and a real worker.

Each example sends garbage, then a well-formed probe must still get its answer: no crash,
no hang, no lost connection. Hypothesis runs in a thread and hands each example to the
event loop, which owns every socket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig  # noqa: E402
from pyisolate._rpc import Endpoint  # noqa: E402
from pyisolate.broker.protocol import BROKER, HOST, PROTOCOL_VERSION, Kind, pack_header, unpack_header  # noqa: E402
from pyisolate.broker.router import Broker  # noqa: E402
from tests.support import ext  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8),
                    st.binary(max_size=16), st.floats(allow_nan=False))
headers = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda kind, call_id, extra: msgpack.packb([kind, call_id, *extra]),
              st.integers(-3, 25), st.integers(-(2**40), 2**40), st.lists(scalars, max_size=5)),
)
bodies = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda code, data: msgpack.packb(msgpack.ExtType(code, data)), st.integers(0, 127),
              st.binary(max_size=64)),
    st.builds(msgpack.packb, st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=20)),
    st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\x91" * 5_000 + b"\xc0",
                     b"\xc7\xff\x0c" + b"\x00" * 10, b"\xc6\xff\xff\xff\xff"]),
)
messages = st.lists(st.one_of(headers, bodies), min_size=0, max_size=6)


def rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_examples(loop: asyncio.AbstractEventLoop, example) -> None:  # type: ignore[no-untyped-def]
    """Run a hypothesis test in this (non-loop) thread, each example on ``loop``."""

    @SETTINGS
    @given(frames=messages, dest=st.sampled_from([b"host", b"probe", b"", b"nobody", b"\xff"]))
    def check(frames: list[bytes], dest: bytes) -> None:
        asyncio.run_coroutine_threadsafe(example(dest, frames), loop).result(timeout=30)

    check()


async def test_broker_and_host_endpoint_survive_random_frames():
    broker = Broker(block_warning=None)
    host = Endpoint(HOST, asyncio.get_running_loop(), lambda dest, frames: broker.send(dest, HOST, frames))
    broker.add_local(HOST, host.on_frames)
    ctx = zmq.asyncio.Context()
    sockets = []

    async def joined(name: str) -> zmq.asyncio.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(broker.endpoint)
        sockets.append(sock)
        broker.registry.expect(name.encode(), b"s" * 32)
        body = msgpack.packb({"name": name, "secret": b"s" * 32, "pid": 1})
        await sock.send_multipart([BROKER, pack_header(Kind.HELLO, 0, PROTOCOL_VERSION), body])
        async with asyncio.timeout(10):
            assert (await sock.recv_multipart())[0] == BROKER
        return sock

    fuzzer, probe = await joined("fuzzer"), await joined("probe")
    stranger = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(broker.endpoint)
    sockets.append(stranger)
    count = 0

    async def example(dest: bytes, frames: list[bytes]) -> None:
        nonlocal count
        count += 1
        await fuzzer.send_multipart([dest, *frames] if frames else [dest])
        await stranger.send_multipart([dest, *frames] if frames else [dest])
        marker = b"probe %d" % count
        await probe.send_multipart([b"probe", pack_header(Kind.CALL, count, "m", 0, "", 0), marker])
        async with asyncio.timeout(10):
            while (await probe.recv_multipart())[2] != marker:  # our probe comes back, routed
                pass
        while await fuzzer.poll(0):  # answers to garbage (UNROUTABLE, errors): read and ignore
            await fuzzer.recv_multipart()

    rss_before = rss()
    try:
        await asyncio.to_thread(run_examples, asyncio.get_running_loop(), example)
        assert broker.dropped > 0  # the garbage was seen, counted and dropped
        assert rss() - rss_before < 64 << 20  # and it left no lasting memory behind
    finally:
        for sock in sockets:
            sock.close()
        ctx.term()
        await host.aclose()
        broker.close()


async def test_a_worker_survives_random_frames(venv_root: Path):
    config = ExtensionManagerConfig(venv_root_path=venv_root)
    async with ExtensionManager(ExtensionBase, config) as manager:
        worker = await manager.load_extension(ExtensionConfig(name="fuzzed", module_path=ext("ok")))
        pid = await worker.pid()
        rss_before = await worker.rss()
        count = 0

        def is_stop(frame: bytes) -> bool:  # STOP from the host is a legitimate order, not garbage
            try:
                return unpack_header(frame)[0] is Kind.STOP
            except ValueError:
                return False

        async def example(dest: bytes, frames: list[bytes]) -> None:
            nonlocal count
            count += 1
            frames = [f for f in frames if not is_stop(f)]
            if len(frames) >= 2:
                manager.broker.send(b"fuzzed", HOST, frames)
            async with asyncio.timeout(10):
                assert await worker.echo(count) == count

        await asyncio.to_thread(run_examples, asyncio.get_running_loop(), example)
        assert await worker.pid() == pid  # the same process answered throughout
        assert await worker.rss() - rss_before < 64 << 20  # garbage leaves no lasting memory behind
