"""Hostile plugins through real workers: forged kinds, names, references, sizes and floods.

The ``hostile`` extension writes to its socket directly, so only the broker's and the
receivers' checks stand between it and its victims. Each test names the promise of
docs/guarantees.md it shows.
"""

from __future__ import annotations

import asyncio
import resource

import pytest
from shared_api import DatabaseAPI

from pyisolate import (
    ConfigError,
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionManager,
    ExtensionManagerConfig,
    MessageTooLargeError,
    ProtocolError,
)
from pyisolate.broker.protocol import Kind
from tests.support import ext, rss

MiB = 1 << 20


def hostile(**kwargs) -> ExtensionConfig:
    return ExtensionConfig(name="hostile", module_path=ext("hostile"), **kwargs)


def fanin(name: str) -> ExtensionConfig:
    return ExtensionConfig(name=name, module_path=ext("fanin"), apis=[DatabaseAPI])


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def test_a_forged_move_cannot_redirect_another_extensions_calls(manager):
    """MOVED (calls by a name go to another actor: a reload's switch) counts only from the
    broker: a plugin telling a victim that "gated" now lives at itself gets nothing of its calls."""
    async with asyncio.timeout(120):
        gated, victim, bad = await asyncio.gather(
            manager.load_extension(fanin("gated")), manager.load_extension(fanin("victim")),
            manager.load_extension(hostile()))
    async with asyncio.timeout(60):
        assert await bad.raw("victim", int(Kind.MOVED), 0, "gated", "hostile")
        assert await bad.raw("host", int(Kind.MOVED), 0, "gated", "hostile")
        assert await victim.echo("after the forgery") == "after the forgery"  # read by now: one pipe, in order
        # Served by gated itself: redirected to the forger, a method it lacks would fail.
        assert type(await victim.call("gated", "refused")) is int


@pytest.mark.parametrize("kind", [Kind.UNROUTABLE, Kind.LOST, Kind.GONE])
async def test_broker_only_notices_from_an_actor_are_dropped(manager, kind):
    """UNROUTABLE, LOST and GONE count only from the broker: a plugin sending them to fail
    another actor's pending calls (an extension's, and the host's) changes nothing."""
    async with asyncio.timeout(120):
        gated, victim, bad = await asyncio.gather(
            manager.load_extension(fanin("gated")), manager.load_extension(fanin("victim")),
            manager.load_extension(hostile()))
    async with asyncio.timeout(60):
        from_victim = asyncio.ensure_future(victim.call("gated", "gate", "victim", 1))
        from_host = asyncio.ensure_future(gated.gate("host", 2))
        assert await victim.call("gated", "echo", "through") == "through"  # its gate call went first
        await bad.forge_notice("victim", int(kind), "gated", 1, 50)
        await bad.forge_notice("host", int(kind), "gated", 1, 50)
        assert await victim.echo("after the forgeries") == "after the forgeries"
        assert not from_victim.done() and not from_host.done()
        await gated.release_all()
        assert await from_victim == 1
        assert await from_host == 2
    assert manager.endpoint.dropped >= 50


async def test_an_answer_from_an_actor_that_was_not_called_is_dropped(manager):
    """A plugin answering calls the host made to someone else: dropped and counted; the real
    answer still arrives."""
    async with asyncio.timeout(120):
        gated, bad = await asyncio.gather(manager.load_extension(fanin("gated")), manager.load_extension(hostile()))
    async with asyncio.timeout(60):
        pending = asyncio.ensure_future(gated.gate("host", 7))
        assert await gated.echo(0) == 0
        dropped, issued = manager.endpoint.calls.dropped, manager.endpoint.calls._next_id
        await bad.forge_answers("host", 1, issued, "forged")  # every call the host made before this one
        assert manager.endpoint.calls.dropped == dropped + issued
        await gated.release_all()
        assert await pending == 7


async def test_actor_names_are_one_namespace(manager):
    """An extension cannot take the name of the host or of a singleton, loaded before or after it."""
    with pytest.raises(ConfigError, match="reserved for the host"):
        manager.load_extension(ExtensionConfig(name="host", module_path=ext("ok")))
    async with asyncio.timeout(120):
        await manager.load_extension(fanin("uses-db"))  # registers the DatabaseAPI singleton
    with pytest.raises(ConfigError, match="one namespace"):
        manager.load_extension(ExtensionConfig(name="DatabaseAPI", module_path=ext("ok")))
    async with asyncio.timeout(120):
        await manager.load_extension(ExtensionConfig(name="SlowService", module_path=ext("ok")))
    from shared_api import SlowService

    with pytest.raises(ConfigError, match="one namespace"):
        manager.load_extension(ExtensionConfig(name="later", module_path=ext("actors"), apis=[SlowService]))


async def test_a_reference_is_honoured_only_between_its_owner_and_whom_it_was_given(manager):
    """A plugin passing the host a reference owned by a third extension is refused (the host
    never runs that extension's callable); calling a live reference of the host that another
    extension holds is refused."""
    async with asyncio.timeout(120):
        a, bad = await asyncio.gather(
            manager.load_extension(ExtensionConfig(name="a", module_path=ext("actors"), apis=[DatabaseAPI])),
            manager.load_extension(hostile(apis=[DatabaseAPI])))
    async with asyncio.timeout(60):
        adder = await a.make_adder(10)  # the host holds a reference owned by a
        assert await adder(1) == 11
        ref_id = adder._pyisolate_ref
        with pytest.raises(ProtocolError, match="only its owner"):
            await bad.send_foreign_reference("DatabaseAPI", "run_callback", "a", ref_id)
        assert await a.adder_calls_seen() == 1  # the forged reference never reached a

        def secret() -> str:
            return "host secret"

        assert await a.keep(secret) is True  # a holds a live reference of the host now
        (host_ref,) = list(manager.endpoint.exports._by_id)
        held = await manager.get_actor(DatabaseAPI).make_secret()  # the host holds one of the singleton's
        assert await held() == "singleton secret"
        (db_ref,) = list(manager._singletons[b"DatabaseAPI"].exports._by_id)
        with pytest.raises(ProtocolError, match="never given to 'hostile'"):  # passed back as if it held it
            await bad.send_foreign_reference("DatabaseAPI", "run_callback", "DatabaseAPI", db_ref)
        with pytest.raises(LookupError, match="not held by 'hostile'"):
            await bad.call_ref("host", host_ref)  # calls a's live reference as if it were its own


async def test_an_exported_callable_object_exposes_only_its_call(manager):
    """A callable object passed as a callback: the receiver can call it, not its methods."""

    class Callback:
        def __call__(self) -> str:
            return "called"

        def delete_everything(self) -> str:
            return "must not run"

    async with asyncio.timeout(120):
        a = await manager.load_extension(ExtensionConfig(name="a", module_path=ext("actors"), apis=[DatabaseAPI]))
    async with asyncio.timeout(60):
        callback = Callback()
        assert await a.call_back(callback) == "called"
        assert await a.keep(callback) is True
        ref_id = manager.endpoint.exports._ids[(id(callback), False)]
        with pytest.raises(AttributeError, match="only calling"):
            await a.call_ref_method("host", ref_id, "delete_everything")


async def test_class_attributes_that_are_not_methods_cannot_be_called(manager):
    """``runner = subprocess.Popen`` on an extension class is not a remote method."""
    async with asyncio.timeout(120):
        e = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
    async with asyncio.timeout(60):
        for name in ("runner", "system", "not_a_method"):
            with pytest.raises(AttributeError, match="no public method"):
                await getattr(e, name)("echo", "hi")
        assert await e.echo("still fine") == "still fine"


async def test_a_frame_over_max_message_size_is_never_allocated(venv_root):
    """A plugin sending a 2 GiB frame, unsolicited or as an answer: the host never allocates it
    (ZMQ_MAXMSGSIZE), cuts the plugin off, and fails its calls with a typed error."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, heartbeat_interval=0.2)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            bad = await manager.load_extension(hostile())
        peak = peak_rss()
        with pytest.raises(ExtensionCrashedError, match="lost its connection"):
            async with asyncio.timeout(60):
                await bad.big_frame("host", 2 << 30)  # its answer went down with its connection
        async with asyncio.timeout(120):
            bad = await manager.load_extension(ExtensionConfig(name="hostile2", module_path=ext("hostile")))
        with pytest.raises(ExtensionCrashedError, match="lost its connection"):
            async with asyncio.timeout(60):
                await bad.answer_big(2 << 30)
        assert peak_rss() - peak < 512 * MiB


async def test_a_message_over_max_message_size_fails_typed_where_it_is_sent(venv_root):
    """max_message_size bounds body plus buffers: an honest caller gets MessageTooLargeError
    before anything is sent, a too large result reaches the caller as MessageTooLargeError, and
    an answer of many frames that add up past the limit is refused by the broker (LOST)."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, max_message_size=4 * MiB, max_queued_bytes=64 * MiB)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            ok, bad = await asyncio.gather(
                manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok"))),
                manager.load_extension(hostile()))
        async with asyncio.timeout(60):
            with pytest.raises(MessageTooLargeError, match="max_message_size"):
                await ok.echo(bytes(5 * MiB))
            assert manager.broker.refused == 0  # refused where it was made: nothing was sent
            assert await ok.echo(bytes(MiB)) == bytes(MiB)
            with pytest.raises(MessageTooLargeError, match="max_message_size"):
                await ok.make_bytes(5 * MiB)
            with pytest.raises(MessageTooLargeError, match="not delivered"):
                await bad.answer_in_frames(8, MiB)
            assert await bad.echo("still connected") == "still connected"


async def test_a_body_of_millions_of_objects_is_refused_quickly(manager):
    """A 64 MiB call body of empty maps (64 million dicts to build) is refused after
    MAX_OBJECTS objects: the host stays small and keeps serving."""
    async with asyncio.timeout(120):
        bad = await manager.load_extension(hostile(apis=[DatabaseAPI]))
    before = rss()
    async with asyncio.timeout(60):
        with pytest.raises(ProtocolError, match="MAX_OBJECTS"):
            await bad.object_bomb("DatabaseAPI", "set")
        assert await bad.echo("alive") == "alive"
    assert rss() - before < 256 * MiB


async def test_event_queues_are_bounded_in_bytes(manager):
    """Six 60 MiB events while the handler is stuck: the first is queued (one event larger than
    the 64 MiB bound still fits an empty queue), five are dropped (counted, before they are even
    decoded), and host memory does not grow by all six (360 MiB)."""
    release, done = asyncio.Event(), asyncio.Event()
    seen: list[int] = []

    async def stuck(sender: str, value: bytes) -> None:
        await release.wait()
        seen.append(len(value))
        done.set()

    manager.on_event("big", stuck)
    async with asyncio.timeout(120):
        bad = await manager.load_extension(hostile())
    before = rss()
    async with asyncio.timeout(60):
        assert await bad.emit_big(6, 60 * MiB) == 6
        assert await bad.echo("after") == "after"  # the events came first, from the same sender
        assert manager._events is not None and manager._events.dropped == 5
        assert rss() - before < 200 * MiB
        release.set()
        await done.wait()
    assert seen == [60 * MiB]
