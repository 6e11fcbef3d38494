"""Named actors through real workers: singletons, addressing, callbacks, chains, streams, events."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

import pytest
from shared_api import DatabaseAPI, SlowService

from pyisolate import (
    ExtensionConfig,
    UnroutableError,
)
from tests.support import ext

APIS = [DatabaseAPI, SlowService]


@pytest.fixture(autouse=True)
def fresh_singletons():
    DatabaseAPI().data.clear()
    SlowService().release.clear()
    SlowService().entered.clear()
    yield
    SlowService().release.set()


async def load(manager, name: str):
    async with asyncio.timeout(120):
        return await manager.load_extension(ExtensionConfig(name=name, module_path=ext("actors"), apis=APIS))


async def test_singleton_state_is_shared_between_extensions(manager):
    a, b = await load(manager, "a"), await load(manager, "b")
    assert await a.db_set("k", {"v": (1, 2)}) is True
    assert await b.db_get("k") == {"v": (1, 2)}  # plain host method
    assert await b.db_aget("k") == {"v": (1, 2)}  # coroutine host method
    assert await b.db_get_sync("k") == {"v": (1, 2)}  # extension's plain code, sync facade
    assert DatabaseAPI().data == {"k": {"v": (1, 2)}}  # the host's one real instance


async def test_slow_singleton_method_stalls_nothing_else(manager):
    a, b = await load(manager, "a"), await load(manager, "b")
    slow = asyncio.ensure_future(a.slow())
    await asyncio.to_thread(SlowService().entered.wait, 30)
    await a.db_set("during", 1)  # same extension, same singleton actor family
    assert await b.db_get("during") == 1
    assert await a.call_actor("b", "echo", "ext to ext") == "ext to ext"
    assert not slow.done()
    SlowService().release.set()
    assert await slow == "unblocked"


async def test_actors_are_reachable_by_name_and_unknown_names_fail_fast(manager):
    a, b = await load(manager, "a"), await load(manager, "b")
    assert await a.call_actor("b", "pid") == await b.pid()
    assert await a.call_actor_sync("b", "echo", 7) == 7
    assert await a.call_actor("DatabaseAPI", "pid") == os.getpid()
    with pytest.raises(UnroutableError, match="nobody"):
        async with asyncio.timeout(10):
            await a.call_actor("nobody", "echo", 1)
    assert await manager.get_actor("b").echo(3) == 3
    assert await manager.get_actor(DatabaseAPI).pid() == os.getpid()
    with pytest.raises(UnroutableError, match="nobody"):
        manager.get_actor("nobody")


async def test_callbacks_run_where_they_were_defined(manager):
    a = await load(manager, "a")
    main_loop = asyncio.get_running_loop()
    seen = []

    def plain(x):
        seen.append(("plain", os.getpid()))
        return x * 2

    async def coro(x):
        seen.append(("coro", asyncio.get_running_loop() is main_loop))
        return x + 1

    class Holder:
        def method(self, x):
            return -x

    assert await a.call_back(plain, 21) == 42
    assert await a.call_back(coro, 1) == 2
    assert await a.call_back(Holder().method, 5) == -5
    assert await a.call_back_sync(plain, 4) == 8  # from the extension's plain code
    assert seen[0] == ("plain", os.getpid()) and seen[1] == ("coro", True)
    adder = await a.make_adder(10)  # a callable coming back from the extension
    assert await adder(5) == 15


async def test_references_are_released_after_10000_calls(manager):
    a = await load(manager, "a")

    def double(x):
        return 2 * x

    for i in range(10_000):
        assert await a.call_back(lambda x, i=i: x + i, 1) == 1 + i
    adders = [await a.make_adder(k) for k in range(100)]
    assert [await f(1) for f in adders[:3]] == [1, 2, 3]
    del adders
    gc.collect()  # our proxies of its adders die; their RELEASEs go out on the next loop turn
    await a.echo(None)  # ... which this round trip gives them, ahead of the next call
    # Its RELEASEs of our 10,000 callbacks travelled ahead of this answer, too.
    assert await a.reference_counts() == {"exports": 0, "proxies": 0}
    assert len(manager.endpoint.exports) == 0
    assert await a.call_back(double, 2) == 4  # still works afterwards


async def test_recursion_ten_levels_deep_and_concurrent_chains(manager):
    a = await load(manager, "a")

    async def step(tag):
        async def host_step(n):
            if n == 0:
                return [tag]
            return [tag, *await a.recurse(n - 1, host_step)]

        return await a.recurse(10, host_step)

    async with asyncio.timeout(60):
        left, right = await asyncio.gather(step("L"), step("R"))
    assert left == ["L"] * 11 and right == ["R"] * 11


async def test_each_host_loop_gets_its_own_chains_back(manager):
    a = await load(manager, "a")
    main_loop = asyncio.get_running_loop()
    results: dict[str, object] = {}

    def other_thread() -> None:
        async def run() -> None:
            own = asyncio.get_running_loop()

            async def where():
                return asyncio.get_running_loop() is own

            results["callback on its loop"] = await a.call_back(where)
            results["singleton on its loop"] = await a.singleton_loop() == id(own)

        asyncio.run(run())

    thread = threading.Thread(target=other_thread)
    thread.start()

    async def where_main():
        return asyncio.get_running_loop() is main_loop

    assert await a.call_back(where_main) is True
    assert await a.singleton_loop() == id(main_loop)
    async with asyncio.timeout(120):  # its calls have their own bound: a hang ends there
        await asyncio.to_thread(thread.join)
    assert results == {"callback on its loop": True, "singleton on its loop": True}


async def test_streams_flow_with_bounded_buffering_and_close_early(manager):
    a = await load(manager, "a")
    async with asyncio.timeout(30):
        assert [x async for x in a.count(5)] == [0, 1, 2, 3, 4]
    stream = a.endless()
    taken = []
    async with asyncio.timeout(30):
        async for item in stream:
            taken.append(item)
            if len(taken) == 100:
                break
    produced = await a.produced_count()
    assert 100 <= produced <= 100 + 16 + 1, produced  # the producer ran at most a window ahead
    await stream.aclose()
    async with asyncio.timeout(10):
        assert await a.wait_closed() is True  # its finally ran
    with pytest.raises(ValueError, match="stream broke"):
        async with asyncio.timeout(30):
            async for _ in a.failing_stream():
                pass


async def test_breaking_out_of_a_stream_closes_the_remote_generator(manager):
    a = await load(manager, "a")

    async def consume():
        async for item in a.endless():
            if item == 2:
                break

    async with asyncio.timeout(30):
        await consume()  # the stream is dropped here
    gc.collect()
    async with asyncio.timeout(10):
        assert await a.wait_closed() is True


async def test_events_arrive_in_order_per_sender_without_waiting_for_handlers(manager):
    a = await load(manager, "a")
    received: list[object] = []
    gate = asyncio.Event()
    done = asyncio.Event()

    async def handler(sender, value):
        await gate.wait()  # the emitter must not wait for this
        received.append((sender, value))
        if len(received) == 200:
            done.set()

    manager.on_event("tick", handler)
    assert await a.emit_events(100) == 100  # returned while the handler is still blocked
    assert await a.emit_from_thread(100) == 100
    assert received == []
    gate.set()
    async with asyncio.timeout(10):
        await done.wait()
    assert [v for _, v in received[:100]] == list(range(100))
    assert [v for _, v in received[100:]] == [("thread", i) for i in range(100)]
    assert {s for s, _ in received} == {"a"}


async def test_references_cannot_be_forged_and_reach_a_third_actor_through_the_sender(manager):
    a, b = await load(manager, "a"), await load(manager, "b")

    def secret():
        return "host secret"

    assert await b.call_back(secret) == "host secret"  # b legitimately held ref 1 for a moment
    keep = lambda: "kept"  # noqa: E731
    held = asyncio.ensure_future(b.call_back(keep))
    assert await held == "kept"
    with pytest.raises(LookupError, match="not held by 'a'"):
        await a.forge_call("host", 1)  # a never received any reference of ours
    # Sent on by a to b, our callback is a's to hand out: b's call goes through a, to us.
    assert await a.pass_on(lambda x: f"host got {x}", "b") == "host got 1"


async def test_a_stream_can_be_consumed_from_another_loop(manager):
    a = await load(manager, "a")

    def other_thread() -> list[int]:
        async def run() -> list[int]:
            return [x async for x in a.count(40)]

        return asyncio.run(run())

    async with asyncio.timeout(60):
        assert await asyncio.to_thread(other_thread) == list(range(40))


async def test_events_beyond_the_bound_are_dropped_loudly(manager, caplog, monkeypatch):
    from pyisolate._host import events as _events

    monkeypatch.setattr(_events.Events, "LIMIT", 10)
    a = await load(manager, "a")
    gate = asyncio.Event()
    seen = []

    async def slow(sender, value):
        await gate.wait()
        seen.append(value)

    manager.on_event("tick", slow)
    await a.emit_events(50)
    await a.echo(None)  # the 50 events arrived ahead of this answer
    assert manager._events.dropped >= 50 - 11  # one may be in the handler, ten queued
    assert any("arrive faster than their handlers" in r.getMessage() for r in caplog.records)
    gate.set()
