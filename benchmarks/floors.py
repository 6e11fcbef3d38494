"""The floors: what the transport costs with no framework at all, measured in the same run.

- *direct floor*: an asyncio ROUTER in this process (``zmq.asyncio``, each message awaited)
  talks straight to a DEALER echo loop in another process, with msgpack headers.
- *bare floor*: the same exchange with the least an asyncio caller can pay: ``add_reader`` on
  the socket's descriptor, pyzmq's compiled send/recv, one future per call. pyisolate's own
  socket pump works this way, so this is the floor it is measured against in earnest.
- *relay floor*: the direct floor's ROUTER (``zmq.asyncio``) relays between two DEALER
  processes; the client (a blocking loop) times its own calls to the echo process through it.
  The *bare relay floor* is the same with the bare floor's ROUTER.
- *pipe floor*: a ``multiprocessing.Pipe`` round trip (``send_bytes``/``recv_bytes`` of
  msgpack, to a child process that is handed the pipe's descriptor; no pickle).

Every pyisolate figure is reported as a ratio to the matching floor.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing.connection
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgpack
import zmq
import zmq.asyncio


_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_MORE, _LAST = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)
_EVENTS, _RCVMORE, _POLLIN = int(zmq.EVENTS), int(zmq.RCVMORE), int(zmq.POLLIN)

#: A DEALER echo loop: answers [header, body] with [header', body] ("len" mode: body's length).
ECHO = r"""
import sys, zmq, msgpack
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)
if len(sys.argv) > 2: s.setsockopt(zmq.IDENTITY, sys.argv[2].encode())
s.connect(sys.argv[1])
s.send_multipart([b"ready", b""])
packb, unpackb = msgpack.packb, msgpack.unpackb
while True:
    frames = s.recv_multipart()
    route, (header, body) = frames[:-2], frames[-2:]
    if header == b"ok":  # the relay's welcome
        continue
    kind, call_id = unpackb(header)[:2]
    if kind == 0:
        break
    if kind == 2:  # a bytes payload: answer its length
        s.send_multipart([*route, packb([7, call_id]), packb(len(body))])
    else:
        s.send_multipart([*route, packb([7, call_id]), packb(unpackb(body)[0][0])])
"""

#: A DEALER client that times calls to "echo" through the relay and prints JSON.
RELAY_CLIENT = r"""
import json, sys, time, zmq, msgpack
count, warmup, in_flight, total = map(int, sys.argv[2:6])
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.IDENTITY, b"client"); s.connect(sys.argv[1])
s.send_multipart([b"ready", b""]); s.recv_multipart()  # the relay knows us now
packb, unpackb = msgpack.packb, msgpack.unpackb
body = packb([[1], {}])
def call(i):
    s.send_multipart([b"echo", packb([6, i, "aecho"]), body]); s.recv_multipart()
for i in range(warmup): call(i)
samples = []
clock = time.perf_counter
for i in range(count):
    start = clock(); call(i); samples.append((clock() - start) * 1e6)
rate = 0.0
if total:
    for i in range(in_flight):
        s.send_multipart([b"echo", packb([6, i, "aecho"]), body])
    start = clock()
    for i in range(total):
        s.recv_multipart()
        if i + in_flight < total:
            s.send_multipart([b"echo", packb([6, i, "aecho"]), body])
    rate = total / (clock() - start)
print(json.dumps({"samples": samples, "rate": rate}))
"""

#: Answers msgpack messages on an inherited multiprocessing.Pipe descriptor.
PIPE_ECHO = r"""
import sys, msgpack
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
while True:
    msg = msgpack.unpackb(conn.recv_bytes())
    if msg is None:
        break
    conn.send_bytes(msgpack.packb(msg))
"""


def _send_frames(sock: Any, frames: list[Any]) -> bool:
    """Send one message (frames under 64 KiB copied, larger ones not); True if one waits to be read."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _send(sock, frame, _MORE if i < last else _LAST, len(frame) < 65536, False)
    return bool(_get(sock, _EVENTS) & _POLLIN)


def _queued(sock: Any) -> Iterator[list[bytes]]:
    """Every message queued on ``sock`` now (the descriptor is edge-triggered: drain it all)."""
    while _get(sock, _EVENTS) & _POLLIN:
        frames = [_recv(sock, _LAST, True, False)]
        while _get(sock, _RCVMORE):
            frames.append(_recv(sock, _LAST, True, False))
        yield frames


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-c", *args, stdout=asyncio.subprocess.PIPE)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


class _BareRouter:
    """The bare way to drive a ROUTER from a loop: ``add_reader`` calls ``_drain``."""

    sock: Any
    loop: asyncio.AbstractEventLoop

    def _send(self, frames: list[Any]) -> None:
        if _send_frames(self.sock, frames):
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        for frames in _queued(self.sock):
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        raise NotImplementedError


class DirectFloor(_BareRouter):
    """A ROUTER on the running loop talking to an echo DEALER process.

    ``style="asyncio"``: the obvious asyncio program, ``zmq.asyncio`` sockets awaited per
    message (the issue's "direct floor"). ``style="bare"``: ``loop.add_reader`` on the
    socket's descriptor and pyzmq's compiled send/recv, a future per call: the least any
    asyncio caller can pay for this transport.
    """

    def __init__(self, style: str) -> None:
        self.style = style
        self.dir = tempfile.TemporaryDirectory(prefix="pyisolate-floor-")
        self.endpoint = f"ipc://{self.dir.name}/floor"
        self.ctx: zmq.Context[Any] = zmq.asyncio.Context() if style == "asyncio" else zmq.Context()
        self.sock: Any = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)
        self.proc: asyncio.subprocess.Process | None = None
        self.rid = b""
        self.small_body = msgpack.packb([[1], {}])
        self.reader: asyncio.Task[None] | None = None
        self.fd: int | None = None

    async def start(self) -> None:
        self.proc = await _spawn(ECHO, self.endpoint)
        if self.style == "asyncio":
            self.rid = (await self.sock.recv_multipart())[0]
            self.reader = asyncio.create_task(self._read())
        else:
            ready: asyncio.Future[bytes] = self.loop.create_future()
            self.pending[0] = ready
            self.fd = self.sock.getsockopt(zmq.FD)
            self.loop.add_reader(self.fd, self._drain)
            self.rid = await ready

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            future = self.pending.pop(msgpack.unpackb(frames[1])[1], None)
            if future is not None:
                future.set_result(frames[2])

    def _handle(self, frames: list[bytes]) -> None:
        if frames[1] == b"ready":
            self.pending.pop(0).set_result(frames[0])
            return
        future = self.pending.pop(msgpack.unpackb(frames[1])[1], None)
        if future is not None:
            future.set_result(frames[2])

    async def _call(self, header: bytes, call_id: int, body: Any) -> bytes:
        future = self.loop.create_future()
        self.pending[call_id] = future
        if self.style == "asyncio":
            await self.sock.send_multipart([self.rid, header, body], copy=len(body) < 65536)
        else:
            self._send([self.rid, header, body])
        result: bytes = await future
        return result

    async def small(self) -> None:
        """One small call: a msgpack header and [[1], {}], echoed."""
        i = next(self.ids)
        await self._call(msgpack.packb([6, i, "aecho", 0, "host", i]), i, self.small_body)

    async def blob(self, payload: bytes) -> None:
        """Send ``payload`` as one raw frame; the answer is its length."""
        i = next(self.ids)
        await self._call(msgpack.packb([2, i]), i, payload)

    async def throughput(self, in_flight: int, total: int) -> float:
        """Small calls per second with ``in_flight`` of them outstanding."""
        return await throughput(self.small, in_flight, total)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
        if self.proc is not None:
            await _stop(self.proc)
        self.sock.close()
        self.ctx.term()
        self.dir.cleanup()


async def throughput(call: Callable[[], Awaitable[Any]], in_flight: int, total: int) -> float:
    """Calls per second of ``call()`` with ``in_flight`` lanes each calling in a loop."""
    per_lane = max(1, total // in_flight)

    async def lane(n: int) -> None:
        for _ in range(n):
            await call()

    await asyncio.gather(*(lane(max(1, per_lane // 4)) for _ in range(in_flight)))  # warm up
    start = time.perf_counter()
    await asyncio.gather(*(lane(per_lane) for _ in range(in_flight)))
    return per_lane * in_flight / (time.perf_counter() - start)


class _Relay(_BareRouter):
    """A ROUTER relay on the running loop: [from, to, ...] becomes [to, from, ...].

    ``style`` as for DirectFloor: "asyncio" awaits each message on ``zmq.asyncio`` sockets,
    "bare" drives the socket from ``add_reader`` with pyzmq's compiled calls.
    """

    def __init__(self, style: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.ctx: zmq.Context[Any] = zmq.asyncio.Context() if style == "asyncio" else zmq.Context()
        self.sock: Any = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.dir = tempfile.TemporaryDirectory(prefix="pyisolate-floor-")
        self.endpoint = f"ipc://{self.dir.name}/relay"
        self.sock.bind(self.endpoint)
        self.joined: asyncio.Queue[bytes] = asyncio.Queue()
        self.fd: int | None = None
        self.task: asyncio.Task[None] | None = None
        if style == "asyncio":
            self.task = asyncio.create_task(self._relay())
        else:
            self.fd = self.sock.getsockopt(zmq.FD)
            self.loop.add_reader(self.fd, self._drain)

    async def _relay(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if frames[1] == b"ready":
                self.joined.put_nowait(frames[0])
                await self.sock.send_multipart([frames[0], b"ok", b""])
            else:
                await self.sock.send_multipart([frames[1], frames[0], *frames[2:]])

    def _handle(self, frames: list[bytes]) -> None:
        if frames[1] == b"ready":
            self.joined.put_nowait(frames[0])
            self._send([frames[0], b"ok", b""])
        else:
            self._send([frames[1], frames[0], *frames[2:]])

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
        self.sock.close()
        self.ctx.term()
        self.dir.cleanup()


class RelayFloor:
    """A client process calls an echo process through a relay ROUTER in this process."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.relay: _Relay | None = None
        self.echo: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.relay = _Relay(self.style)
        self.echo = await _spawn(ECHO, self.relay.endpoint, "echo")
        await self.relay.joined.get()

    async def run(self, count: int, warmup: int, in_flight: int = 1, total: int = 0) -> dict[str, Any]:
        """Latency samples (us) of ``count`` calls, and the rate with ``in_flight`` outstanding."""
        assert self.relay is not None
        client = await _spawn(RELAY_CLIENT, self.relay.endpoint, str(count), str(warmup), str(in_flight), str(total))
        try:
            assert client.stdout is not None
            out: dict[str, Any] = json.loads(await client.stdout.read())
            await client.wait()
            await self.relay.joined.get()
            return out
        finally:
            await _stop(client)

    async def close(self) -> None:
        if self.echo is not None:
            await _stop(self.echo)
        if self.relay is not None:
            await self.relay.close()


def pipe_samples(count: int, warmup: int) -> list[float]:
    """Latency samples (us) of multiprocessing.Pipe round trips of a small msgpack message."""
    ours, theirs = multiprocessing.connection.Pipe()
    proc = subprocess.Popen([sys.executable, "-c", PIPE_ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        msg = msgpack.packb([6, 1, "aecho", [[1], {}]])
        for _ in range(warmup):
            ours.send_bytes(msg)
            ours.recv_bytes()
        samples = []
        clock = time.perf_counter
        for _ in range(count):
            start = clock()
            ours.send_bytes(msg)
            ours.recv_bytes()
            samples.append((clock() - start) * 1e6)
        ours.send_bytes(msgpack.packb(None))
        proc.wait(timeout=10)
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return samples




__all__ = ["DirectFloor", "RelayFloor", "pipe_samples", "throughput"]
