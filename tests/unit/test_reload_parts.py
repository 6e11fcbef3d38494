"""Reload's pure parts: the config fields, the missing-extra error, stale bytecode removal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pyisolate import (
    ConfigError,
    ExtensionClosedError,
    ExtensionConfig,
    ExtensionManagerConfig,
    ExtensionReloadedError,
)
from pyisolate._host.generations import drop_bytecode
from pyisolate._host.watch import require_watchfiles


def test_watch_fields_are_checked(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("")
    assert ExtensionConfig(name="m", module_path=module).watch is None
    with pytest.raises(ConfigError, match=r"ExtensionConfig.watch .*True, False or None"):
        ExtensionConfig(name="m", module_path=module, watch="yes")
    with pytest.raises(ConfigError, match="ExtensionManagerConfig.watch must be True or False"):
        ExtensionManagerConfig(venv_root_path=tmp_path, watch=1)
    with pytest.raises(ConfigError, match="reload_drain_timeout must be a positive number"):
        ExtensionManagerConfig(venv_root_path=tmp_path, reload_drain_timeout=0)


def test_without_watchfiles_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "watchfiles", None)
    with pytest.raises(ConfigError, match=r"extension 'nodes'.*pip install 'pyisolate\[watch\]'"):
        require_watchfiles("nodes")


def test_only_the_extensions_own_compiled_files_are_removed(tmp_path: Path) -> None:
    package = tmp_path / "pack"
    (package / "__pycache__").mkdir(parents=True)
    (package / "sub" / "__pycache__").mkdir(parents=True)
    stale = [package / "__pycache__" / "__init__.cpython-311.pyc",
             package / "sub" / "__pycache__" / "x.cpython-311.pyc"]
    kept = [package / "__init__.py", package / "notes.pyc", package / "__pycache__" / "README"]
    elsewhere = tmp_path / "__pycache__" / "other.cpython-311.pyc"
    elsewhere.parent.mkdir()
    for path in [*stale, *kept, elsewhere]:
        path.write_text("x")
    assert drop_bytecode(package) == 2
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in [*kept, elsewhere])
    single = tmp_path / "single" / "mod.py"  # a single-file module: its folder's __pycache__
    (single.parent / "__pycache__").mkdir(parents=True)
    single.write_text("")
    (single.parent / "__pycache__" / "mod.cpython-311.pyc").write_text("x")
    assert drop_bytecode(single) == 1


def test_the_reloaded_error_is_a_closed_error_with_its_fields() -> None:
    error = ExtensionReloadedError("extension 'a' was reloaded", extension="a", generation=3)
    assert isinstance(error, ExtensionClosedError) and error.extension == "a" and error.generation == 3


async def test_the_call_count_drains_and_refuses_once_retired() -> None:
    import asyncio
    import threading

    from pyisolate._host.drain import CallCount

    count = CallCount(asyncio.get_running_loop())
    assert count.enter() and count.enter() and count.open == 2
    count.leave()
    count.retire()
    assert not count.enter() and count.open == 1  # refused, not counted
    assert await count.drain(0.05) is False  # one still open: the bound holds
    waiting = asyncio.ensure_future(count.drain(30))
    await asyncio.sleep(0)
    assert not waiting.done()
    threading.Thread(target=count.leave).start()  # the last call ends on another thread
    async with asyncio.timeout(30):
        assert await waiting is True
    assert count.open == 0


def test_the_call_count_is_exact_under_threads() -> None:
    import asyncio
    import threading

    from pyisolate._host.drain import CallCount

    loop = asyncio.new_event_loop()
    try:
        count = CallCount(loop)

        def churn() -> None:
            for _ in range(20_000):
                assert count.enter()
                count.leave()

        threads = [threading.Thread(target=churn) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert count.open == 0
    finally:
        loop.close()


async def test_a_stopped_watch_has_let_go_of_its_thread_and_descriptors(tmp_path: Path) -> None:
    """The watch's native thread closes its descriptors as it exits: stopping waits for that."""
    import asyncio
    import os

    from pyisolate._host.watch import _watch_threads, watch_source

    def fds() -> set[str]:
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                found.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue
        return found

    before_fds, before_threads = fds(), _watch_threads()
    watching = asyncio.Event()

    async def never() -> None:
        raise AssertionError("nothing changed")

    task = asyncio.ensure_future(watch_source("m", tmp_path, never, watching.set))
    async with asyncio.timeout(30):
        await watching.wait()
    assert _watch_threads() - before_threads, "the watch runs a thread of its own"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert _watch_threads() == before_threads
    assert fds() <= before_fds
