"""Honest load and floods through real workers: fan-in, per-sender caps, fairness, streams.

Each test says which promise of docs/guarantees.md it shows.
"""

from __future__ import annotations

import asyncio
import collections
import os

import pytest
from shared_api import DatabaseAPI, SlowService

from pyisolate import (
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionManager,
    ExtensionManagerConfig,
    ProtocolError,
)
from tests.support import block_until_readable, ext, fifo, rss

MiB = 1 << 20


def fanin(name: str) -> ExtensionConfig:
    return ExtensionConfig(name=name, module_path=ext("fanin"), apis=[DatabaseAPI])


class Gates:
    """The gate events of one extension, in the order it emitted them."""

    def __init__(self, manager: ExtensionManager) -> None:
        self.log: list[tuple[str, str, int]] = []
        self._changed = asyncio.Condition()
        manager.on_event("gate", self._on)

    async def _on(self, sender: str, event: tuple[str, str, int]) -> None:
        async with self._changed:
            self.log.append(event)
            self._changed.notify_all()

    async def until(self, what: str, count: int) -> None:
        async with asyncio.timeout(60), self._changed:
            await self._changed.wait_for(lambda: sum(1 for e in self.log if e[0] == what) >= count)

    def most_open(self, sender: str) -> int:
        """The most calls of ``sender`` open at once, replayed from the log."""
        now = most = 0
        for what, who, _ in self.log:
            if who == sender:
                now += 1 if what == "start" else -1
                most = max(most, now)
        return most

    def first_end_before_start(self, sender: str, i: int) -> bool:
        """Whether one of ``sender``'s calls ended before its call ``i`` started."""
        for what, who, n in self.log:
            if who == sender and what == "end":
                return True
            if who == sender and what == "start" and n == i:
                return False
        raise AssertionError(f"call {i} of {sender} never started")


async def test_fan_in_from_six_callers_to_one_busy_actor_loses_no_call(venv_root):
    """The host and five extensions send 600 calls each (within max_in_flight) to one extension
    whose loop is blocked for a second: every call returns its own value, no caller sees a
    zmq error or a full queue, host memory stays bounded, and the heartbeat task survives."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, heartbeat_interval=0.2, heartbeat_timeout=5)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            busy, *callers = await asyncio.gather(*(manager.load_extension(fanin(n))
                                                    for n in ["busy", "c0", "c1", "c2", "c3", "c4"]))
        blocking = asyncio.Event()
        manager.on_event("blocking", lambda sender, seconds: blocking.set())
        before = rss()
        async with asyncio.timeout(120):
            blocked = asyncio.ensure_future(busy.block_loop(1.0))
            await blocking.wait()  # its loop is blocked from here: nothing it is sent gets read

            async def from_host() -> tuple[int, list[str]]:
                results = await asyncio.gather(*(busy.echo(i) for i in range(600)), return_exceptions=True)
                return (sum(1 for i, r in enumerate(results) if r == i),
                        [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)][:5])

            outcomes = await asyncio.gather(from_host(), *(c.fan("busy", 600) for c in callers))
            assert await blocked is True
        assert [list(o) for o in outcomes] == [[600, []]] * 6, outcomes
        assert rss() - before < 64 * MiB
        assert manager.broker.queued(b"busy") == 0
        assert manager._heartbeats is not None and not manager._heartbeats.done()
        # Liveness still works after the fan-in: a worker that hangs now is found and killed.
        with pytest.raises(ExtensionCrashedError, match="heartbeats"):
            async with asyncio.timeout(60):
                await busy.block_loop(60)


async def test_call_65_waits_until_one_of_the_first_64_ends(venv_root):
    """max_in_flight=64: the host's 65th call to one actor starts only after one of its first
    64 ended; the cap is per sender, and the rest wait in the host (nothing is refused)."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, max_in_flight=64)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            gated, releaser = await asyncio.gather(manager.load_extension(fanin("gated")),
                                                   manager.load_extension(fanin("releaser")))
        gates = Gates(manager)
        async with asyncio.timeout(60):
            calls = asyncio.gather(*(gated.gate("host", i) for i in range(65)))
            await gates.until("start", 64)
            assert manager.endpoint.calls.slots.open(b"gated") == 64
            await releaser.call("gated", "release", 1)  # another sender: its own slots
            await gates.until("start", 65)
            await releaser.call("gated", "release_all")
            assert await calls == list(range(65))
        assert gates.first_end_before_start("host", 64)
        assert gates.most_open("host") == 64
        assert await releaser.call("gated", "refused") == 0


async def test_the_cap_holds_for_each_of_several_senders_to_one_actor(venv_root):
    """Three extensions each make 65 calls to one actor (max_in_flight=64): each has at most 64
    open there at once, and each one's 65th starts only after one of its own ended."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, max_in_flight=64)
    async with ExtensionManager(ExtensionBase, config) as manager:
        names = ["s0", "s1", "s2"]
        async with asyncio.timeout(120):
            gated, *senders = await asyncio.gather(*(manager.load_extension(fanin(n)) for n in ["gated", *names]))
        gates = Gates(manager)
        async with asyncio.timeout(60):
            fans = asyncio.gather(*(s.fan_gate("gated", 65) for s in senders))
            await gates.until("start", 3 * 64)
            await gated.release(1)  # the host is a fourth sender, with slots of its own
            await gates.until("start", 3 * 64 + 1)
            await gated.release_all()
            assert await fans == [list(range(65))] * 3
        for name in names:
            assert gates.most_open(name) == 64, name
            assert gates.first_end_before_start(name, 64), name
        assert await gated.refused() == 0  # honest senders never meet the receiver's refusal


async def test_a_sender_that_ignores_the_cap_has_its_excess_refused(venv_root):
    """A plugin sending 100 CALLs at once past max_in_flight=64: the receiver runs 64 and refuses
    36 with QueueFullError; it never holds more than the cap for that sender."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, max_in_flight=64)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            gated, hostile = await asyncio.gather(
                manager.load_extension(fanin("gated")),
                manager.load_extension(ExtensionConfig(name="hostile", module_path=ext("hostile"))))
        gates = Gates(manager)
        async with asyncio.timeout(60):
            await hostile.flood_calls("gated", "gate", 100, ["hostile", 0])
            await gates.until("start", 64)
            assert await gated.refused() == 36  # answered once the whole flood was read
            await gated.release_all()
            await gates.until("end", 64)
        assert gates.most_open("hostile") == 64


async def test_a_flood_at_a_singleton_does_not_starve_another_caller(venv_root):
    """One extension fires 100,000 calls at a singleton without awaiting them; another
    extension's calls to the same singleton still answer within 100 ms (median), and the
    host's memory grows by less than 64 MiB."""
    # Scheduling 100,000 tasks keeps the flooder's own loop busy for seconds (asyncio runs every
    # ready task in one turn): its heartbeats wait that long, so the limit is raised here.
    config = ExtensionManagerConfig(venv_root_path=venv_root, heartbeat_timeout=120, call_timeout=300)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            flooder, other = await asyncio.gather(manager.load_extension(fanin("flooder")),
                                                  manager.load_extension(fanin("other")))
            await other.latencies(5)  # warm: the singleton's proxy and thread pool exist
        before = rss()
        async with asyncio.timeout(300):
            await flooder.start_flood(100_000)
            median, worst = await other.latencies(50)
            grown = rss() - before
            assert await flooder.flood_done() == (100_000, 100_000)
        assert median < 0.1, (median, worst)
        assert grown < 64 * MiB, grown


async def test_a_raw_flood_at_a_singleton_is_refused_past_the_cap_and_memory_stays_bounded(venv_root):
    """A plugin that bypasses its own cap and sends 50,000 CALLs at once to a singleton whose
    method holds each one: the singleton holds max_in_flight (512) and refuses the other
    49,488; another caller is still served, and host memory stays bounded."""
    # The flood keeps the plugin's own loop busy for seconds (more on a loaded machine): not
    # what this test is about, so its heartbeats may wait longer than the default 10 s.
    config = ExtensionManagerConfig(venv_root_path=venv_root, heartbeat_timeout=60)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            hostile, other = await asyncio.gather(
                manager.load_extension(ExtensionConfig(name="hostile", module_path=ext("hostile"),
                                                       apis=[DatabaseAPI, SlowService])),
                manager.load_extension(fanin("other")))
            await other.latencies(5)
        slow = manager._singletons[b"SlowService"]
        SlowService().release.clear()  # the one instance of the host: held until released below
        before = rss()
        try:
            async with asyncio.timeout(300):
                await hostile.flood_calls("SlowService", "block", 50_000, ())
                assert await hostile.echo("read") == "read"  # after its 50,000 CALLs, from the same sender
                assert slow.server.open_calls(b"hostile") == 512
                assert slow.server.refused == 50_000 - 512
                median, _ = await other.latencies(20)
                grown = rss() - before
        finally:
            SlowService().release.set()
        assert median < 0.1
        assert grown < 64 * MiB


async def test_a_stream_producer_that_ignores_the_window_is_cut_off(venv_root):
    """A producer that sends 200,000 items without credit: the consumer gets the 16 the window
    allowed, then the stream ends with ProtocolError; nothing past the window is kept."""
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        async with asyncio.timeout(120):
            hostile = await manager.load_extension(ExtensionConfig(name="hostile", module_path=ext("hostile")))
        flooded = asyncio.Event()
        manager.on_event("flooded", lambda sender, n: flooded.set())
        before = rss()
        got: list[int] = []
        with pytest.raises(ProtocolError, match="past the window"):
            async with asyncio.timeout(120):
                stream = hostile.stream_flood(200_000).__aiter__()
                got.append(await stream.__anext__())  # the call starts; 1 taken: no credit granted yet
                await flooded.wait()  # every item has reached the host by now
                while True:
                    got.append(await stream.__anext__())
        assert len(got) == 16
        assert rss() - before < 64 * MiB
        async with asyncio.timeout(60):
            assert await hostile.echo(1) == 1
        counts: collections.Counter[int] = collections.Counter(got)
        assert set(counts) <= {0}


async def test_workers_queue_while_the_host_loop_is_blocked_and_nothing_is_lost(venv_root, tmp_path):
    """The host's loop blocks while an extension sends 5,000 events and a call's answer: its
    socket's pipe fills (zmq says Again), the rest waits in the worker, in order, and all of it
    arrives once the host reads again."""
    config = ExtensionManagerConfig(venv_root_path=venv_root, sandbox={"writable_paths": [tmp_path]})  # the FIFO
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            bad = await manager.load_extension(ExtensionConfig(name="hostile", module_path=ext("hostile")))
        ticks: list[int] = []
        manager.on_event("tick", lambda sender, i: ticks.append(i))
        done = fifo(tmp_path / "done")
        try:
            async with asyncio.timeout(60):
                call = asyncio.ensure_future(bad.emit_ticks(5000, str(tmp_path / "done")))
                await asyncio.sleep(0)  # one turn: the call leaves; then the loop blocks
                block_until_readable(done, 30)  # until the worker has emitted all 5,000
                assert await call == 5000
                assert await bad.echo("behind them") == "behind them"
        finally:
            os.close(done)
        assert ticks == list(range(5000))


async def test_past_max_queued_bytes_a_worker_refuses_new_work_with_queue_full(venv_root, tmp_path):
    """While the host does not read, a worker keeps at most max_queued_bytes waiting: an event
    past that fails where it is emitted, with QueueFullError naming the queue and the limit."""
    from pyisolate import QueueFullError

    config = ExtensionManagerConfig(venv_root_path=venv_root, max_message_size=MiB, max_queued_bytes=MiB,
                                    sandbox={"writable_paths": [tmp_path]})  # the FIFO
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(120):
            bad = await manager.load_extension(ExtensionConfig(name="hostile", module_path=ext("hostile")))
        async with asyncio.timeout(60):
            # More messages than the pipes hold (1,000 in the worker's socket, 1,000 in the host's):
            # the rest waits in the worker, and past 1 MiB of it the emitter is refused.
            done = fifo(tmp_path / "done")
            try:
                call = asyncio.ensure_future(bad.emit_big(6000, 1000, str(tmp_path / "done")))
                await asyncio.sleep(0)  # one turn: the call leaves; then the loop blocks
                block_until_readable(done, 30)  # until the worker has emitted, or was refused
            finally:
                os.close(done)
            with pytest.raises(QueueFullError, match="outgoing queue is full.*max_queued_bytes=1048576"):
                await call
            assert await bad.echo("still serving") == "still serving"
