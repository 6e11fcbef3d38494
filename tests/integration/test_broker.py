"""The broker with real sockets: joining, routing by name, sender stamping, refusals."""

from __future__ import annotations

import asyncio
import os
import stat

import msgpack
import pytest
import zmq
import zmq.asyncio

from pyisolate.broker.protocol import BROKER, PROTOCOL_VERSION, Kind, pack_header, unpack_header
from pyisolate.broker.router import Broker


@pytest.fixture
async def broker():
    b = Broker(block_warning=None)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def ctx():
    c = zmq.asyncio.Context()
    yield c
    c.term()


class Peer:
    """A bare DEALER speaking the protocol by hand."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def hello(self, name: str, secret: bytes, version: int = PROTOCOL_VERSION) -> tuple[Kind, list[object]]:
        body = msgpack.packb({"name": name, "secret": secret, "pid": os.getpid()})
        await self.sock.send_multipart([BROKER, pack_header(Kind.HELLO, 0, version), body])
        frames = await self.recv()
        assert frames[0] == BROKER
        kind, _, extra = unpack_header(frames[1])
        return kind, extra

    async def recv(self) -> list[bytes]:
        async with asyncio.timeout(10):
            return await self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers(ctx, broker):
    made: list[Peer] = []

    def make() -> Peer:
        peer = Peer(ctx, broker.endpoint)
        made.append(peer)
        return peer

    yield make
    for p in made:
        p.close()


async def join(broker: Broker, peer: Peer, name: str) -> None:
    broker.registry.expect(name.encode(), b"s" * 32)
    kind, _ = await peer.hello(name, b"s" * 32)
    assert kind is Kind.WELCOME


async def test_endpoint_is_ipc_in_a_private_directory_removed_at_close():
    broker = Broker(block_warning=None)
    path = broker.endpoint.removeprefix("ipc://")
    directory = os.path.dirname(path)
    assert broker.endpoint.startswith("ipc://")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    broker.close()
    assert not os.path.exists(directory)
    broker.close()  # idempotent


async def test_routes_by_name_stamps_the_sender_and_never_decodes_bodies(broker, peers):
    a, b = peers(), peers()
    await join(broker, a, "a")
    await join(broker, b, "b")
    garbage = b"\xc1 not msgpack at all"
    header = pack_header(Kind.CALL, 1, "m")
    await a.sock.send_multipart([b"b", header, garbage, b"raw buffer"])
    frames = await b.recv()
    assert frames == [b"a", header, garbage, b"raw buffer"]


async def test_unroutable_message_is_answered_to_its_sender(broker, peers):
    a = peers()
    await join(broker, a, "a")
    header = pack_header(Kind.CALL, 42, "m")
    await a.sock.send_multipart([b"nobody", header, b""])
    frames = await a.recv()
    assert frames[0] == BROKER
    kind, _, extra = unpack_header(frames[1])
    assert kind is Kind.UNROUTABLE and extra[0] == "nobody"
    assert frames[2] == header  # the sender can match it to its call


async def test_duplicate_name_is_refused(broker, peers):
    a, impostor = peers(), peers()
    await join(broker, a, "a")
    broker.registry.expect(b"a", b"s" * 32)  # even with a valid secret
    kind, extra = await impostor.hello("a", b"s" * 32)
    assert kind is Kind.REFUSED and "taken" in extra[0]


async def test_wrong_secret_unknown_name_and_wrong_version_are_refused(broker, peers):
    broker.registry.expect(b"x", b"s" * 32)
    kind, extra = await peers().hello("x", b"t" * 32)
    assert kind is Kind.REFUSED and "secret" in extra[0]
    kind, extra = await peers().hello("never-announced", b"s" * 32)
    assert kind is Kind.REFUSED and "starting" in extra[0]
    kind, extra = await peers().hello("x", b"s" * 32, version=PROTOCOL_VERSION + 1)
    assert kind is Kind.REFUSED and "protocol" in extra[0]
    # The legitimate worker can still join afterwards.
    kind, _ = await peers().hello("x", b"s" * 32)
    assert kind is Kind.WELCOME


async def test_messages_from_connections_that_did_not_join_are_dropped_and_counted(broker, peers):
    a, stranger = peers(), peers()
    await join(broker, a, "a")
    await stranger.sock.send_multipart([b"a", pack_header(Kind.CALL, 1, "m"), b""])
    await stranger.sock.send_multipart([b"only two", b"frames"])
    # The broker handles one connection's messages in order: once a valid HELLO from the
    # stranger is refused, the earlier messages have been dropped.
    kind, _ = await stranger.hello("ghost", b"")
    assert kind is Kind.REFUSED
    assert broker.dropped == 2
    await a.sock.send_multipart([b"a", pack_header(Kind.CALL, 2, "m"), b"to myself"])
    frames = await a.recv()
    assert frames[2] == b"to myself"  # nothing from the stranger reached "a"


async def test_host_side_actor_is_served_in_place(broker, peers):
    received: asyncio.Queue[tuple[bytes, list[bytes]]] = asyncio.Queue()
    broker.add_local(b"svc", lambda sender, frames: received.put_nowait((sender, frames)))
    a = peers()
    await join(broker, a, "a")
    await a.sock.send_multipart([b"svc", b"h", b"b"])
    async with asyncio.timeout(10):
        sender, frames = await received.get()
    assert sender == b"a" and frames == [b"h", b"b"]
    broker.send(b"a", b"svc", [b"h2", b"b2"])
    assert await a.recv() == [b"svc", b"h2", b"b2"]
    with pytest.raises(LookupError):
        broker.send(b"nobody", b"svc", [b"h", b"b"])


async def test_a_worker_cannot_join_under_a_host_actors_name(broker, peers):
    """Actor names are one namespace: a name served in the host is refused at expect and at join."""
    broker.add_local(b"Vault", lambda sender, frames: None)
    with pytest.raises(ValueError, match="taken by an actor of the host"):
        broker.expect(b"Vault", b"s" * 32)
    broker.registry.expect(b"Vault", b"s" * 32)  # even if the registry were told to expect it
    kind, extra = await peers().hello("Vault", b"s" * 32)
    assert kind is Kind.REFUSED and "belongs to an actor of the host" in extra[0]


async def test_refused_joins_are_logged_with_a_rate_limit(ctx, caplog):
    """5,000 refused HELLOs: every one is answered and counted, a handful are logged."""
    broker = Broker(block_warning=None, clock=lambda: 0.0)  # one rate-limit window throughout
    peer = Peer(ctx, broker.endpoint)
    try:
        body = msgpack.packb({"name": "nobody", "secret": b"x", "pid": os.getpid()})
        header = pack_header(Kind.HELLO, 0, PROTOCOL_VERSION)
        with caplog.at_level("WARNING", logger="pyisolate.broker"):
            for _ in range(10):
                for _ in range(500):
                    await peer.sock.send_multipart([BROKER, header, body])
                for _ in range(500):
                    kind, _, _ = unpack_header((await peer.recv())[1])
                    assert kind is Kind.REFUSED
        assert broker.refused_joins == 5000
        refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refusals) == 5
        assert "only counted" in refusals[-1].getMessage()
    finally:
        peer.close()
        broker.close()


async def test_a_move_is_settled_once_every_worker_acknowledged_or_left(broker, peers):
    a, b = peers(), peers()
    await join(broker, a, "a")
    await join(broker, b, "b")
    settled = broker.move(b"ext", b"ext@1")
    for peer in (a, b):
        frames = await peer.recv()
        assert frames[0] == BROKER and unpack_header(frames[1]) == (Kind.MOVED, 0, ["ext", "ext@1"])
    await a.sock.send_multipart([BROKER, pack_header(Kind.MOVED, 0, "ext", "ext@1"), b""])
    await b.sock.send_multipart([BROKER, pack_header(Kind.MOVED, 0, "ext", "elsewhere"), b""])  # not this move
    await b.sock.send_multipart([b"a", pack_header(Kind.CALL, 1, "m"), b""])  # behind b's acknowledgement
    await a.recv()  # so the broker has read both acknowledgements
    assert not settled.done()  # b acknowledged another move, not this one
    await b.sock.send_multipart([BROKER, pack_header(Kind.MOVED, 0, "ext", "ext@1"), b""])
    async with asyncio.timeout(10):
        await settled
    # A worker that leaves without acknowledging does not hold a move up.
    again = broker.move(b"ext", b"ext@2")
    await a.sock.send_multipart([BROKER, pack_header(Kind.MOVED, 0, "ext", "ext@2"), b""])
    await a.sock.send_multipart([b"b", pack_header(Kind.CALL, 2, "m"), b""])
    assert unpack_header((await b.recv())[1])[0] is Kind.MOVED
    await b.recv()
    assert not again.done()
    broker.forget(b"b")
    assert again.done()
    # A worker joining now is told in its WELCOME.
    d = peers()
    broker.registry.expect(b"d", b"s" * 32)
    kind, extra = await d.hello("d", b"s" * 32)
    assert kind is Kind.WELCOME and extra == [PROTOCOL_VERSION, {"ext": "ext@2"}, []]  # [version, moves, actors apart]
    broker.move(b"ext", b"ext")  # undone: the name is its own again
    assert broker.moves == {}
