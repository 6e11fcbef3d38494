"""Hosts written for pyisolate 0.10 (docs/guides/migrating-from-0.10.md): configs as dicts, the
manager's ``extensions``, the handle's ``name``, ``config`` and ``state``, ``PYISOLATE_CHILD``,
``stop_all_extensions()``; each through real workers."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

import pyisolate
from pyisolate import (
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionLoadError,
    ExtensionManager,
    SandboxMode,
    SyncExtensionManager,
)
from pyisolate.workers import confine
from tests.support import ext

needs_landlock = pytest.mark.skipif(
    not sys.platform.startswith("linux") or int(confine.probe()["landlock_abi"]) < 6,  # type: ignore[call-overload]
    reason="sandbox_mode='required' needs all of the sandbox (Landlock ABI 6, Linux 6.12+)",
)


@needs_landlock
async def test_a_config_written_as_a_0_10_host_writes_it_loads(venv_root: Path) -> None:
    # The shape ComfyUI passes: plain dicts, a mode string, /dev/shm among the writable paths.
    async with asyncio.timeout(180), ExtensionManager(ExtensionBase, {"venv_root_path": str(venv_root)}) as manager:
        handle = await manager.load_extension({
            "name": "sandboxed", "module_path": ext("sandboxed"), "isolated": True, "dependencies": [],
            "share_torch": False, "share_cuda_ipc": False, "execution_model": "host-coupled",
            "sandbox_mode": "required",
            "sandbox": {"network": False, "writable_paths": ["/dev/shm"], "readonly_paths": []},
        })  # fmt: skip
        assert isinstance(handle.config, ExtensionConfig) and handle.config.sandbox_mode == "required"
        status = await handle.status()
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"  # confined, as required
        marker = f"/dev/shm/pyisolate-upstream-{os.getpid()}"
        try:
            assert await handle.write(marker, "ok") == "ok"  # a grant every worker has: asked for, no more
        finally:
            if os.path.exists(marker):
                os.unlink(marker)


async def test_the_enum_mode_in_a_dict_and_load_extensions_of_dicts(manager: ExtensionManager[ExtensionBase]) -> None:
    async with asyncio.timeout(180):
        loaded = await manager.load_extensions([
            {"name": "ok", "module_path": ext("ok"), "sandbox_mode": SandboxMode.PREFERRED},
            ExtensionConfig(name="named", module_path=ext("named")),
        ])  # fmt: skip
    assert list(loaded) == ["ok", "named"]
    assert loaded["ok"].config.sandbox_mode == "preferred" and type(loaded["ok"].config.sandbox_mode) is str
    assert await loaded["ok"].echo((1, b"x")) == (1, b"x")


async def test_the_handle_says_its_name_config_and_state_through_a_load_and_a_stop(
    manager: ExtensionManager[ExtensionBase],
) -> None:
    config = ExtensionConfig(name="ok", module_path=ext("ok"))
    handle = manager.load_extension(config)
    assert handle.name == "ok" and handle.config is config
    assert handle.state == "starting"  # its venv and process are on the way
    assert dict(manager.extensions) == {"ok": handle} and manager.extensions["ok"] is handle
    assert manager.get_actor("ok") is handle  # one handle per extension
    async with asyncio.timeout(180):
        await handle
    assert handle.state == "ready"
    snapshot = manager.extensions
    with pytest.raises(TypeError):
        snapshot["other"] = handle  # type: ignore[index]
    await handle.stop()
    assert handle.state == "stopped"
    assert dict(manager.extensions) == {} and list(snapshot) == ["ok"]  # a snapshot, taken when read


async def test_the_state_of_one_that_failed_to_load_and_one_that_crashed(
    manager: ExtensionManager[ExtensionBase],
) -> None:
    broken = manager.load_extension(ExtensionConfig(name="broken", module_path=ext("broken_import")))
    async with asyncio.timeout(180):
        with pytest.raises(ExtensionLoadError):
            await broken
        assert broken.state == "failed"
        ok = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok")))
        with pytest.raises(ExtensionCrashedError):
            await ok.crash(3)
    assert ok.state == "crashed"
    assert {name: h.state for name, h in manager.extensions.items()} == {"broken": "failed", "ok": "crashed"}


async def test_an_in_process_extension_has_a_state_too(manager: ExtensionManager[ExtensionBase]) -> None:
    handle = manager.load_extension(ExtensionConfig(name="local", module_path=ext("ok"), isolated=False))
    assert handle.state == "starting"
    async with asyncio.timeout(30):
        await handle
    assert handle.state == "ready" and handle.name == "local" and not handle.config.isolated
    await handle.stop()
    assert handle.state == "stopped"


async def test_methods_named_like_the_handles_attributes_are_reached_with_method(
    manager: ExtensionManager[ExtensionBase],
) -> None:
    async with asyncio.timeout(180):
        named = await manager.load_extension(ExtensionConfig(name="named", module_path=ext("named")))
        assert named.name == "named" and named.state == "ready"  # the handle's
        assert await pyisolate.method(named, "name")() == "the extension's own name()"
        assert await pyisolate.method(named, "config")("k") == {"key": "k"}
        assert await pyisolate.method(named, "state")() == "the extension's own state()"
    with pytest.raises(AttributeError, match="only public methods"):
        pyisolate.method(named, "_private")
    with pytest.raises(TypeError, match="needs an extension handle"):
        pyisolate.method(manager, "name")  # type: ignore[arg-type]


async def test_workers_see_pyisolate_child_and_the_host_does_not(manager: ExtensionManager[ExtensionBase]) -> None:
    async with asyncio.timeout(180):
        ok = await manager.load_extension(ExtensionConfig(name="ok", module_path=ext("ok"),
                                                          env={"PYISOLATE_CHILD": "0"}))  # fmt: skip
        value, _, _ = await ok.environment("PYISOLATE_CHILD")
    assert value == "1"  # always: shared code tells the sides apart by it
    assert "PYISOLATE_CHILD" not in os.environ


async def test_stop_all_extensions_is_stop_all(venv_root: Path) -> None:
    manager = ExtensionManager(ExtensionBase, {"venv_root_path": venv_root})
    async with asyncio.timeout(180):
        ok = await manager.load_extension({"name": "ok", "module_path": ext("ok")})
        await manager.stop_all_extensions()
    assert ok.state == "stopped" and dict(manager.extensions) == {}
    with pytest.raises(pyisolate.ExtensionClosedError):
        manager.load_extension({"name": "ok", "module_path": ext("ok")})


def test_the_sync_manager_takes_dicts_and_its_handles_say_their_name(venv_root: Path) -> None:
    with SyncExtensionManager(ExtensionBase, {"venv_root_path": venv_root}) as manager:
        named = manager.load_extension({"name": "named", "module_path": ext("named")})
        assert named.name == "named" and named.state == "ready" and named.config.name == "named"
        assert pyisolate.method(named, "name")() == "the extension's own name()"
        assert list(manager.extensions) == ["named"] and manager.extensions["named"].state == "ready"
        manager.stop_all_extensions()
        assert named.state == "stopped"
