"""The synchronous facades: a host that is not async, and blocking calls from threads."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from shared_api import DatabaseAPI

import pyisolate
from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig, SyncExtensionManager
from tests.support import ext


def test_sync_host_uses_extensions_and_singletons_without_asyncio(venv_root: Path):
    config = ExtensionManagerConfig(venv_root_path=venv_root)
    events = []
    with SyncExtensionManager(ExtensionBase, config) as manager:
        manager.on_event("tick", lambda sender, value: events.append(value))
        actors = manager.load_extension(ExtensionConfig(name="a", module_path=ext("actors"), apis=[DatabaseAPI]))
        ok = manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
        assert ok.process_data([1, 2, 3]) == 2.0  # values, not awaitables
        assert actors.db_set("k", "v") is True
        assert manager.get_actor("DatabaseAPI").get("k") == "v"
        assert manager.get_actor("ok").echo((1, 2)) == (1, 2)
        assert actors.call_back(lambda x: x * 3, 2) == 6
        assert actors.emit_events(3) == 3
        assert list(actors.count(4)) == [0, 1, 2, 3]  # a stream, iterated without asyncio
        for item in actors.endless():
            if item == 3:
                break
        with pytest.raises(ValueError, match="boom"):
            ok.raise_value_error("boom")
        pid = ok.pid()
        ok.stop()
    assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped


async def test_sync_facades_refuse_to_run_inside_an_event_loop(venv_root: Path):
    config = ExtensionManagerConfig(venv_root_path=venv_root)
    async with asyncio.timeout(30):
        sync_manager = await asyncio.to_thread(SyncExtensionManager, ExtensionBase, config)
    try:
        with pytest.raises(RuntimeError, match="await the call instead"):
            sync_manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
    finally:
        async with asyncio.timeout(60):
            await asyncio.to_thread(sync_manager.stop_all)
    async with ExtensionManager(ExtensionBase, config) as manager:
        extension = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
        with pytest.raises(RuntimeError, match="await the call instead"):
            pyisolate.sync(extension).echo(1)
        async with asyncio.timeout(60):
            assert await asyncio.to_thread(lambda: pyisolate.sync(extension).echo(5)) == 5  # from a thread: fine


async def test_threads_calling_at_once_each_get_their_own_answer_and_a_blocked_one_holds_none_up(
        venv_root: Path):
    """Eight host threads call one extension through pyisolate.sync() at once (plain and async
    methods), while a ninth waits in a plain method that blocks until the end."""
    config = ExtensionManagerConfig(venv_root_path=venv_root)
    async with ExtensionManager(ExtensionBase, config) as manager:
        extension = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
        blocking = pyisolate.sync(extension)
        waiting = asyncio.Event()
        manager.on_event("waiting", lambda sender, what: waiting.set())

        def calls(t: int) -> list[object]:
            return [blocking.echo((t, i)) if i % 2 else blocking.aecho(t, i) for i in range(40)]

        async with asyncio.timeout(120):
            slow = asyncio.ensure_future(asyncio.to_thread(blocking.wait_sync))
            await waiting.wait()
            results = await asyncio.gather(*(asyncio.to_thread(calls, t) for t in range(8)))
            assert not slow.done()
            assert await extension.release_sync_waiter() is True
            assert await slow == "sync released"
        assert results == [[(t, i) if i % 2 else ((t, i), {}) for i in range(40)] for t in range(8)]


async def test_a_thread_whose_call_times_out_gets_call_timeout_error(venv_root: Path):
    config = ExtensionManagerConfig(venv_root_path=venv_root, call_timeout=0.3)
    async with ExtensionManager(ExtensionBase, config) as manager:
        extension = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
        blocking = pyisolate.sync(extension)
        async with asyncio.timeout(60):
            with pytest.raises(pyisolate.CallTimeoutError, match="wait_sync"):
                await asyncio.to_thread(blocking.wait_sync)
            assert await asyncio.to_thread(blocking.release_sync_waiter) is True
            assert await asyncio.to_thread(blocking.echo, 7) == 7
