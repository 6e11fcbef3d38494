"""The core runtime through real worker processes, sockets and venvs."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from pathlib import Path

import pytest

import pyisolate
from pyisolate import (
    ConfigError,
    EncodeError,
    ExtensionBase,
    ExtensionClosedError,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionLoadError,
    ExtensionManager,
    ExtensionManagerConfig,
    RemoteError,
)
from tests.support import alive, ext


def ok_config(name: str = "ok", **kw) -> ExtensionConfig:
    return ExtensionConfig(name=name, module_path=ext("ok"), **kw)


async def test_unawaited_load_then_first_call_waits_for_ready(manager):
    extension = manager.load_extension(ok_config())
    async with asyncio.timeout(120):
        assert await extension.process_data([1, 2, 3, 4, 5]) == 3.0


async def test_awaited_load_returns_the_ready_extension(manager):
    async with asyncio.timeout(120):
        extension = await manager.load_extension(ok_config())
        assert isinstance(extension, pyisolate.Extension)
        pid = await extension.pid()
    assert pid != os.getpid() and alive(pid)


async def test_worker_runs_the_venv_interpreter_and_sees_its_own_packages_first(manager, venv_root):
    async with asyncio.timeout(120):
        extension = await manager.load_extension(ok_config())
        executable = await extension.executable()
        path = await extension.sys_path()
        with pytest.raises(ModuleNotFoundError):  # numpy is in the host, not in this venv
            await extension.module_file("numpy")
        zmq_file = await extension.module_file("zmq")
    assert Path(executable).parent.parent == venv_root / "ok"
    site = [i for i, p in enumerate(path) if p.startswith(str(venv_root / "ok")) and p.endswith("site-packages")]
    runtime = [i for i, p in enumerate(path) if ".runtime" in p]
    assert site and runtime and max(site) < min(runtime), path
    assert not any(p.endswith("site-packages") and str(venv_root) not in p for p in path), path
    import zmq

    assert os.path.realpath(zmq_file) == os.path.realpath(zmq.__file__)  # the host's own files


async def test_hooks_run_in_documented_order_and_stop_ends_the_process(manager, tmp_path):
    extension = await manager.load_extension(ok_config())
    # OkExtension is defined by the module, so its own before_module_loaded runs after the import.
    assert await extension.hook_order() == ["before_module_loaded", "on_module_loaded:ok"]
    marker = tmp_path / "stopped"
    await extension.set_stop_marker(str(marker))
    pid = await extension.pid()
    await extension.stop()
    assert marker.read_text() == "before_module_loaded,on_module_loaded:ok,stop"
    assert not alive(pid)
    await extension.stop()  # idempotent
    with pytest.raises(ExtensionClosedError):
        await extension.echo(1)


async def test_application_subclass_drives_a_plain_module(venv_root):
    from app_base import AppExtension

    config = ExtensionManagerConfig(venv_root_path=venv_root)
    async with ExtensionManager(AppExtension, config) as manager:
        extension = await manager.load_extension(ExtensionConfig(name="plain", module_path=ext("plain")))
        assert await extension.hook_order() == ["before_module_loaded", "on_module_loaded"]
        assert await extension.call_module("double", 21) == 42
        assert await extension.module_attr("ANSWER") == 42
        assert await extension.pid() != os.getpid()


async def test_isolated_false_runs_in_the_host_behind_the_same_api(manager, tmp_path):
    try:
        extension = await manager.load_extension(ok_config("inproc", isolated=False))
        assert await extension.pid() == os.getpid()
        assert await extension.process_data([1, 2, 3]) == 2.0
        before, loaded = await extension.hook_order()
        assert before == "before_module_loaded" and loaded.startswith("on_module_loaded:") and loaded.endswith("ok")
        with pytest.raises(ValueError, match="boom"):
            await extension.raise_value_error("boom")
        marker = tmp_path / "stopped"
        await extension.set_stop_marker(str(marker))
        await extension.stop()
        assert marker.read_text().endswith("stop")
    finally:
        for name in ("ok", "pyisolate_extension_ok"):
            sys.modules.pop(name, None)


async def test_context_manager_stops_every_process(venv_root):
    config = ExtensionManagerConfig(venv_root_path=venv_root)
    async with ExtensionManager(ExtensionBase, config) as warm:  # first use opens lasting fds (uv, imports)
        await warm.load_extension(ok_config("warm-up"))
    fds_before = len(os.listdir("/proc/self/fd"))
    async with ExtensionManager(ExtensionBase, config) as manager:
        a = manager.load_extension(ok_config("ok-a"))
        b = manager.load_extension(ok_config("ok-b"))
        pids = await asyncio.gather(a.pid(), b.pid())
        assert all(alive(p) for p in pids)
    assert not any(alive(p) for p in pids)
    assert len(os.listdir("/proc/self/fd")) == fds_before  # sockets, pipes, contexts: all closed
    with pytest.raises(ExtensionClosedError):
        await a.echo(1)


async def test_slow_calls_do_not_hold_up_fast_ones(manager):
    extension = await manager.load_extension(ok_config())
    await extension.remember_loop()
    slow_async = asyncio.ensure_future(extension.wait_async())
    slow_sync = asyncio.ensure_future(extension.wait_sync())
    assert await extension.echo("fast") == "fast"  # answered while both slow calls are pending
    assert not slow_async.done() and not slow_sync.done()
    await extension.release_async_waiter()
    await extension.release_sync_waiter()
    assert await slow_async == "async released"
    assert await slow_sync == "sync released"


async def test_remote_exceptions_keep_their_type_message_and_traceback(manager):
    extension = await manager.load_extension(ok_config())
    with pytest.raises(ValueError, match="bad input") as info:
        await extension.raise_value_error("bad input")
    assert "raise_value_error" in info.value.remote_traceback
    with pytest.raises(KeyError) as key_info:
        await extension.raise_key_error(7)
    assert key_info.value.args == (7,)
    with pytest.raises(RemoteError) as remote:
        await extension.raise_custom()
    assert remote.value.remote_type.endswith("CustomError")
    assert "only the extension knows" in str(remote.value)
    assert await extension.echo("still usable") == "still usable"


async def test_only_public_methods_are_callable(manager):
    extension = await manager.load_extension(ok_config())
    with pytest.raises(AttributeError):
        extension._private  # noqa: B018  refused locally
    with pytest.raises(AttributeError, match="no public method"):
        await extension.not_a_method()
    with pytest.raises(AttributeError, match="no public method"):
        await extension.no_such_method()
    with pytest.raises(AttributeError, match="cannot be called remotely"):
        await extension.on_module_loaded(None)


async def test_values_survive_the_trip(manager):
    extension = await manager.load_extension(ok_config())
    value = {
        1: ("tuple", b"bytes", {2, 3}, frozenset({4})),
        (5, 6): [None, True, 1.5, -(2**70)],
        "big": b"x" * (1 << 20),
    }
    assert await extension.echo(value) == value
    args, kwargs = await extension.aecho((1, 2), b"\x00", key={1: "int key"})
    assert args == [(1, 2), b"\x00"] or args == ((1, 2), b"\x00")
    assert kwargs == {"key": {1: "int key"}}


async def test_unsupported_values_fail_clearly_and_the_connection_stays_usable(manager):
    extension = await manager.load_extension(ok_config())
    with pytest.raises(EncodeError, match=r"type 'object' at argument 1, key 'x': supported types are") as info:
        await extension.echo({"x": object()})
    assert isinstance(info.value, TypeError)
    with pytest.raises(EncodeError, match=r"type 'object' at keyword argument 'value', item 1"):
        await extension.echo(value=[1, object()])
    with pytest.raises(TypeError, match=r"type 'object' at the return value, key 'ok', item 2"):
        await extension.return_unsendable()
    assert await extension.echo("usable") == "usable"


async def test_crash_fails_every_pending_call_with_exit_code_and_stderr(manager):
    extension = await manager.load_extension(ok_config())
    other = await manager.load_extension(ok_config("bystander"))
    pending = asyncio.ensure_future(extension.wait_async())
    assert await extension.echo(1) == 1  # the pending call has reached the worker
    async with asyncio.timeout(10):
        with pytest.raises(ExtensionCrashedError) as crash:
            await extension.crash(7)
        with pytest.raises(ExtensionCrashedError):
            await pending
    error = crash.value
    assert error.extension == "ok" and error.exit_code == 7
    assert "about to crash on purpose" in error.stderr_tail
    assert "'ok'" in str(error) and "7" in str(error)
    with pytest.raises(ExtensionCrashedError):
        await extension.echo(2)
    assert await other.echo("carries on") == "carries on"


async def test_import_failure_fails_load_with_its_traceback(manager):
    with pytest.raises(ExtensionLoadError) as info:
        async with asyncio.timeout(120):
            await manager.load_extension(ExtensionConfig(name="broken", module_path=ext("broken_import")))
    assert "pyisolate_test_module_that_does_not_exist" in str(info.value)
    assert "ModuleNotFoundError" in str(info.value)


async def test_hook_failure_fails_load(manager):
    extension = manager.load_extension(ExtensionConfig(name="load-raises", module_path=ext("load_raises")))
    with pytest.raises(ExtensionLoadError, match="on_module_loaded refused to start"):
        async with asyncio.timeout(120):
            await extension.anything()


async def test_duplicate_name_is_refused(manager):
    first = manager.load_extension(ok_config())
    with pytest.raises(ConfigError, match="already loaded"):
        manager.load_extension(ok_config())
    await first


async def test_calls_from_other_threads_and_loops(manager):
    extension = await manager.load_extension(ok_config())
    results: list[object] = []
    errors: list[BaseException] = []

    def other_thread() -> None:
        async def run() -> None:
            results.append(await extension.echo("from another loop"))
            results.append(await asyncio.gather(*(extension.echo(i) for i in range(10))))

        try:
            asyncio.run(run())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    async with asyncio.timeout(120):  # its calls have their own bound: a hang ends there
        await asyncio.to_thread(thread.join)
    assert not errors, errors
    assert results == ["from another loop", list(range(10))]


async def test_manager_outside_a_loop_says_how_to_use_it(venv_root):
    manager = ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root))

    def sync_load() -> None:
        manager.load_extension(ok_config())

    with pytest.raises(RuntimeError, match="async code"):
        async with asyncio.timeout(30):
            await asyncio.to_thread(sync_load)
    await manager.stop_all()


async def test_a_value_the_receiver_cannot_decode_fails_the_call_clearly(manager):
    import numpy

    from pyisolate import ProtocolError

    extension = await manager.load_extension(ok_config())  # its venv has no numpy
    with pytest.raises(ProtocolError, match="numpy is not installed") as info:
        await extension.echo(numpy.ones(4))
    assert isinstance(info.value, ValueError)
    assert await extension.echo("still usable") == "still usable"


async def test_an_import_failure_is_reported_once_with_the_extensions_own_frames(manager, caplog):
    """A failing import reaches the host once, as ExtensionLoadError; its traceback starts at
    the extension's file, without pyisolate's loader frames or importlib's machinery."""
    with caplog.at_level("DEBUG", logger="pyisolate.extension"):
        with pytest.raises(ExtensionLoadError) as info:
            async with asyncio.timeout(120):
                await manager.load_extension(ExtensionConfig(name="broken", module_path=ext("broken_import")))
    tb = info.value.remote_traceback
    assert "broken_import/__init__.py" in tb and "pyisolate_test_module_that_does_not_exist" in tb
    assert "loader.py" not in tb and "<frozen importlib" not in tb and "__main__.py" not in tb
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "Traceback" in r.getMessage()]


async def test_importing_a_host_module_without_apis_says_to_list_its_singletons(manager):
    """An extension importing the host's singleton module without ``apis=[...]`` fails to load
    with a message that names the singletons and the fix; with apis= it loads."""
    from shared_api import DatabaseAPI, SlowService

    with pytest.raises(ExtensionLoadError, match=r"'shared_api' is a module of the host .*"
                                                 r"apis=\[DatabaseAPI, SlowService\]"):
        async with asyncio.timeout(120):
            await manager.load_extension(ExtensionConfig(name="needs-apis", module_path=ext("needs_apis")))
    async with asyncio.timeout(120):
        fixed = await manager.load_extension(ExtensionConfig(
            name="needs-apis-fixed", module_path=ext("needs_apis"), apis=[DatabaseAPI, SlowService]))
        assert await fixed.ping() == "pong"
