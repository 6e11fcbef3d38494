"""Hot reload: ``Extension.reload()`` and ``ExtensionConfig(watch=True)``, with real workers.

Each test copies tests/extensions/reloadable to its own folder and edits the copy. Tests wait
on the manager's reload events (``pyisolate.reload.*``) and on the extension's own events,
each with a deadline; none sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import pyisolate
from pyisolate import (
    ConfigError,
    ExtensionBase,
    ExtensionClosedError,
    ExtensionConfig,
    ExtensionLoadError,
    ExtensionManager,
    ExtensionManagerConfig,
    ExtensionReloadedError,
    SyncExtensionManager,
)
from tests.package_index import write_wheel
from tests.support import alive, child_pids, ext

DEADLINE = 120.0
NAME = "reloadable"


class Seen:
    """Every event the manager delivers, by name, and a way to wait for the n-th of one."""

    def __init__(self, manager: ExtensionManager[Any]) -> None:
        self.events: dict[str, list[Any]] = defaultdict(list)
        self._changed = asyncio.Event()
        manager.on_event("*", self._on)

    def _on(self, sender: str, item: tuple[str, Any]) -> None:
        self.events[item[0]].append((sender, item[1]))
        self._changed.set()

    async def nth(self, name: str, n: int = 1, timeout: float = DEADLINE) -> Any:
        """The value of the ``n``-th event ``name`` (1-based), once it has arrived."""
        async with asyncio.timeout(timeout):
            while len(self.events[name]) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.events[name][n - 1][1]

    def count(self, name: str) -> int:
        return len(self.events[name])


def copy_extension(tmp_path: Path) -> Path:
    target = tmp_path / NAME
    shutil.copytree(ext(NAME), target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def set_version(folder: Path, version: str) -> None:
    source = folder / "__init__.py"
    lines = source.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.startswith("VERSION = "))
    lines[index] = f"VERSION = {version!r}\n"
    source.write_text("".join(lines))


def append(folder: Path, code: str) -> None:
    source = folder / "__init__.py"
    source.write_text(source.read_text() + "\n" + code + "\n")


async def load(manager: ExtensionManager[Any], folder: Path, **fields: Any) -> Any:
    async with asyncio.timeout(DEADLINE):
        return await manager.load_extension(ExtensionConfig(name=NAME, module_path=folder, **fields))


async def test_reload_serves_the_edited_code_from_a_new_process(manager, tmp_path):
    folder = copy_extension(tmp_path)
    seen = Seen(manager)
    extension = await load(manager, folder)
    old_pid = await extension.pid()
    assert await extension.version() == "v1"
    set_version(folder, "v2")  # same size, same second: only the bytecode check could tell
    async with asyncio.timeout(DEADLINE):
        await extension.reload()
    assert await extension.version() == "v2"
    assert await extension.pid() != old_pid
    assert not alive(old_pid), "the old worker outlived its reload"
    assert extension.state == "ready"
    assert manager.extensions[NAME] is extension
    started, switched, finished = [await seen.nth(f"pyisolate.reload.{what}") for what in
                                   ("started", "switched", "finished")]
    assert started["generation"] == switched["generation"] == finished["generation"] == 1
    assert finished["pid"] == await extension.pid() and finished["drained"] is True
    assert seen.events["pyisolate.reload.finished"][0][0] == NAME  # the sender is the extension's name
    set_version(folder, "v3")
    async with asyncio.timeout(DEADLINE):
        await extension.reload()
    assert await extension.version() == "v3"
    # The extension's stats go on across its workers: every call counted, two reloads.
    stats = pyisolate.stats(extension)
    assert stats["reloads"] == 2 and stats["pid"] == await extension.pid()
    assert stats["methods"]["version"]["calls"] == 3 and stats["methods"]["pid"]["calls"] == 3
    assert manager.stats()["extensions"][NAME]["reloads"] == 2


async def test_a_call_running_on_the_old_worker_finishes_there(manager, tmp_path):
    folder = copy_extension(tmp_path)
    seen = Seen(manager)
    extension = await load(manager, folder)
    gate = await extension.gate()
    async with asyncio.timeout(DEADLINE):
        held = asyncio.ensure_future(extension.hold())
        old_pid = await seen.nth("holding")
        set_version(folder, "v2")
        reloading = asyncio.ensure_future(extension.reload())
        await seen.nth("pyisolate.reload.switched")
        assert await extension.version() == "v2"  # new calls: the new worker
        assert not held.done() and not reloading.done()  # the old one drains its call
        assert alive(old_pid)
        assert await gate.open() == "v1"
        assert await held == "v1"  # answered by the old code
        await reloading
    assert not alive(old_pid)
    assert (await seen.nth("pyisolate.reload.finished"))["drained"] is True


async def test_calls_running_past_the_drain_timeout_fail_typed(venv_root, tmp_path):
    config = ExtensionManagerConfig(venv_root_path=venv_root, reload_drain_timeout=0.5)
    async with ExtensionManager(ExtensionBase, config) as manager:
        folder = copy_extension(tmp_path)
        seen = Seen(manager)
        extension = await load(manager, folder)
        async with asyncio.timeout(DEADLINE):
            held = asyncio.ensure_future(extension.hold())
            await seen.nth("holding")
            await extension.reload()
            with pytest.raises(ExtensionReloadedError, match="reloaded"):
                await held
        assert (await seen.nth("pyisolate.reload.finished"))["drained"] is False


async def test_objects_callbacks_and_streams_of_the_old_worker_fail_naming_the_reload(manager, tmp_path):
    folder = copy_extension(tmp_path)
    extension = await load(manager, folder)
    async with asyncio.timeout(DEADLINE):
        gate = await extension.gate()
        greet = await extension.greeter()
        assert await greet("a") == "v1: hello a"
        stream = extension.count(1_000_000)
        assert await anext(stream) == 0
        await extension.reload()
        for call in (gate.open, lambda: greet("b")):
            with pytest.raises(ExtensionReloadedError) as info:
                await call()
            assert info.value.extension == NAME and info.value.generation == 1
            assert "was reloaded" in str(info.value)
        with pytest.raises(ExtensionReloadedError):
            for _ in range(1_000_000):  # what arrived before the old worker went, then the error
                await anext(stream)
        assert await extension.version() == "v1"  # the extension itself serves on
        assert await (await extension.greeter())("c") == "v1: hello c"


BROKEN = {
    "syntax": ("def broken(:\n", "SyntaxError"),
    "import": ("import pyisolate_no_such_module_xyz\n", "No module named 'pyisolate_no_such_module_xyz'"),
    "before_module_loaded": ("class Refuses(Reloadable):\n    def before_module_loaded(self):\n"
                             "        raise RuntimeError('before hook says no')\n", "before hook says no"),
    "on_module_loaded": ("class Refuses(Reloadable):\n    def on_module_loaded(self, module):\n"
                         "        raise RuntimeError('on hook says no')\n", "on hook says no"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
async def test_a_failing_reload_leaves_the_old_worker_serving(manager, tmp_path, kind):
    folder = copy_extension(tmp_path)
    seen = Seen(manager)
    extension = await load(manager, folder)
    old_pid = await extension.pid()
    good = (folder / "__init__.py").read_text()
    code, marker = BROKEN[kind]
    set_version(folder, "v2")
    append(folder, code)
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(ExtensionLoadError) as info:
            await extension.reload()
    assert marker in info.value.remote_traceback
    assert "Traceback" in info.value.remote_traceback or kind == "syntax"
    assert await extension.version() == "v1" and await extension.pid() == old_pid
    assert extension.state == "ready"
    failed = await seen.nth("pyisolate.reload.failed")
    assert failed == {"generation": 1, "error": str(info.value)}
    assert seen.count("pyisolate.reload.switched") == 0
    assert {p for p in child_pids() if alive(p)} >= {old_pid}
    (folder / "__init__.py").write_text(good)
    set_version(folder, "v3")
    async with asyncio.timeout(DEADLINE):
        await extension.reload()
    assert await extension.version() == "v3"


async def test_no_call_fails_at_200_calls_per_second_during_20_reloads(manager, tmp_path):
    folder = copy_extension(tmp_path)
    extension = await load(manager, folder)
    rate, reloads = 200, 20
    sent = answered = 0
    failures: list[BaseException] = []
    answers: set[str] = set()
    calls: set[asyncio.Task[Any]] = set()
    stop = asyncio.Event()
    newest = asyncio.Event()  # a call of the load was answered by the last generation

    async def one() -> None:
        nonlocal answered
        try:
            answer = await extension.version()
            answers.add(answer)
            answered += 1
            if answer == f"v{reloads + 1}":
                newest.set()
        except BaseException as exc:  # every failure is counted, of any kind
            failures.append(exc)

    async def load_at_rate() -> None:
        nonlocal sent
        loop = asyncio.get_running_loop()
        began = loop.time()
        while not stop.is_set() and sent < rate * 600:  # bounded: at most 10 minutes' worth
            task = asyncio.ensure_future(one())
            calls.add(task)
            task.add_done_callback(calls.discard)
            sent += 1
            # The load's pace (not a synchronisation): the next call is due at sent / rate.
            await asyncio.sleep(max(0.0, began + sent / rate - loop.time()))

    async with asyncio.timeout(600):
        loader = asyncio.ensure_future(load_at_rate())
        began = time.monotonic()
        for generation in range(1, reloads + 1):
            set_version(folder, f"v{generation + 1}")
            await extension.reload()
        elapsed = time.monotonic() - began
        async with asyncio.timeout(DEADLINE):
            await newest.wait()  # the load keeps going until it reached the newest code
        stop.set()
        await loader
        await asyncio.gather(*calls)
    assert failures == [], f"{len(failures)} of {sent} calls failed, first: {failures[:1]!r}"
    assert answered == sent
    assert sent >= rate * elapsed * 0.5, f"only {sent} calls in {elapsed:.1f} s: the load was not steady"
    assert await extension.version() == f"v{reloads + 1}"
    assert {f"v{g + 1}" for g in (1, reloads)} <= answers  # the load reached new code through the reloads
    print(f"\n{sent} calls at {sent / elapsed:.0f}/s during {reloads} reloads in {elapsed:.1f} s, 0 failed")


async def test_watch_reloads_on_an_edit_and_survives_a_broken_one(manager, tmp_path):
    folder = copy_extension(tmp_path)
    seen = Seen(manager)
    extension = await load(manager, folder, watch=True)
    await seen.nth("pyisolate.reload.watching")
    set_version(folder, "v2")
    await until_serving(seen, extension, "v2")
    good = (folder / "__init__.py").read_text()
    append(folder, "def broken(:\n")
    failed = await seen.nth("pyisolate.reload.failed")
    assert "SyntaxError" in failed["error"]
    assert await extension.version() == "v2"  # the old worker serves on
    (folder / "__init__.py").write_text(good)
    set_version(folder, "v3")
    await until_serving(seen, extension, "v3")  # the watch went on after the failure


async def until_serving(seen: Seen, extension: Any, version: str) -> None:
    """Wait, reload by reload, until the extension answers ``version`` (an editor's save may be
    seen as more than one batch of changes, each a reload)."""
    done = seen.count("pyisolate.reload.finished")
    async with asyncio.timeout(DEADLINE):
        while await extension.version() != version:
            done += 1
            await seen.nth("pyisolate.reload.finished", done)


async def test_watch_without_watchfiles_names_the_extra(venv_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # what an environment without it imports
    folder = copy_extension(tmp_path)
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        with pytest.raises(ConfigError, match=r"pyisolate\[watch\]"):
            manager.load_extension(ExtensionConfig(name=NAME, module_path=folder, watch=True))
        assert manager.extensions == {} and child_pids() == set()
    everywhere = ExtensionManagerConfig(venv_root_path=venv_root, watch=True)
    async with ExtensionManager(ExtensionBase, everywhere) as manager:
        with pytest.raises(ConfigError, match=r"pyisolate\[watch\]"):
            manager.load_extension(ExtensionConfig(name=NAME, module_path=folder))
        extension = await load(manager, folder, watch=False)  # an extension may opt out
        assert await extension.version() == "v1"


@pytest.mark.venv
async def test_the_venv_is_rebuilt_only_when_the_dependencies_change(venv_root, tmp_path):
    steps: list[str] = []
    config = ExtensionManagerConfig(venv_root_path=tmp_path / "venvs",
                                    on_progress=lambda event: steps.append(str(event.step)))
    write_wheel(tmp_path / "wheels", "pyi-tiny", "1.2.3")
    empty = tmp_path / "empty-index"
    empty.mkdir()
    folder = copy_extension(tmp_path)
    append(folder, "def tiny(self):\n    import pyi_tiny\n    return pyi_tiny.__name__\nReloadable.tiny = tiny\n")
    async with ExtensionManager(ExtensionBase, config) as manager:
        extension = await load(manager, folder)
        async with asyncio.timeout(DEADLINE):
            steps.clear()
            await extension.reload()
            assert steps == ["reused"]  # unchanged dependencies: no installer run
            steps.clear()
            await extension.reload(replace(extension.config, dependencies=["pyi-tiny==1.2.3"],
                                           index_url=empty.as_uri(), find_links=[tmp_path / "wheels"]))
            assert "creating" in steps and steps[-1] == "done"  # the reload waited for the build
            assert await extension.tiny() == "pyi_tiny"


async def test_a_reload_whose_build_fails_leaves_the_old_worker_its_venv(venv_root, tmp_path):
    """The new venv is built beside the one in use: a failed build takes nothing from the old
    worker, which still imports from its venv afterwards (a lazy import, made only now)."""
    venvs = tmp_path / "venvs"
    write_wheel(tmp_path / "wheels", "pyi-tiny", "1.2.3")
    empty = tmp_path / "empty-index"
    empty.mkdir()
    folder = copy_extension(tmp_path)
    append(folder, "def tiny(self):\n    import pyi_tiny\n    return pyi_tiny.VERSION\nReloadable.tiny = tiny\n")
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venvs)) as manager:
        extension = await load(manager, folder, dependencies=["pyi-tiny==1.2.3"], index_url=empty.as_uri(),
                               find_links=[tmp_path / "wheels"])
        pid = await extension.pid()
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(pyisolate.EnvironmentBuildError, match="pyi-tiny"):
                await extension.reload(replace(extension.config, dependencies=["pyi-tiny==9.9.9"]))
            assert await extension.pid() == pid  # the old worker serves on
            assert await extension.tiny() == "1.2.3"  # from its venv, still whole
            write_wheel(tmp_path / "wheels", "pyi-tiny", "2.0.0")
            await extension.reload(replace(extension.config, dependencies=["pyi-tiny==2.0.0"]))
            assert await extension.tiny() == "2.0.0"
        assert list((venvs / ".build").iterdir()) == []  # no build left behind, failed or finished


async def test_reload_refuses_another_name_and_a_stopped_extension(manager, tmp_path):
    folder = copy_extension(tmp_path)
    extension = await load(manager, folder)
    with pytest.raises(ConfigError, match="keeps its name"):
        await extension.reload(ExtensionConfig(name="other", module_path=folder))
    await extension.stop()
    with pytest.raises(ExtensionClosedError):
        await extension.reload()


async def test_no_worker_is_left_after_the_manager_stops_mid_reload(venv_root, tmp_path):
    folder = copy_extension(tmp_path)
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        seen = Seen(manager)
        extension = await load(manager, folder)
        pids = {await extension.pid()}
        async with asyncio.timeout(DEADLINE):
            held = asyncio.ensure_future(extension.hold())
            await seen.nth("holding")
            reloading = asyncio.ensure_future(extension.reload())
            switched = await seen.nth("pyisolate.reload.switched")  # two workers run: one drains
            pids.add(switched["pid"])
            assert all(alive(pid) for pid in pids)
    results = await asyncio.gather(held, reloading, return_exceptions=True)
    assert all(isinstance(r, BaseException) for r in results), results
    assert not any(alive(pid) for pid in pids)
    assert child_pids() == set()


async def test_an_extension_cannot_fake_reload_events(manager, tmp_path):
    seen = Seen(manager)
    extension = await load(manager, copy_extension(tmp_path))
    async with asyncio.timeout(DEADLINE):
        await extension.emit_event("pyisolate.reload.finished", {"generation": 7, "pid": 1, "drained": True})
        await extension.emit_event("after", 1)
        await seen.nth("after")  # one sender's events arrive in order: the first was dropped before it
    assert seen.count("pyisolate.reload.finished") == 0


def test_a_sync_host_reloads_through_the_blocking_handle(venv_root, tmp_path):
    folder = copy_extension(tmp_path)
    with SyncExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        extension = manager.load_extension(ExtensionConfig(name=NAME, module_path=folder))
        assert extension.version() == "v1"
        set_version(folder, "v2")
        extension.reload()
        assert extension.version() == "v2"
        set_version(folder, "v3")
        manager.get_actor(NAME).reload()
        assert extension.version() == "v3"


async def test_a_share_torch_extension_reloads_forked_from_the_fork_server(venv_root):
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        probe = ExtensionConfig(name="zprobe", module_path=ext("zygote_probe"), share_torch=True)
        async with asyncio.timeout(DEADLINE):
            extension = await manager.load_extension(probe)
            assert manager._zygote is not None
            server = await manager._zygote
            assert server is not None, "the fork server failed to start"
            first = await extension.where()
            assert first["ppid"] == server.process.pid
            await extension.reload()
            second = await extension.where()
        assert second["ppid"] == server.process.pid  # forked too, not spawned
        assert second["pid"] != first["pid"] and not alive(first["pid"])


async def test_a_call_that_reaches_the_old_worker_after_the_switch_goes_to_the_new_one(manager, tmp_path):
    """A caller on another thread can read the old worker just before the switch and start its
    call just after; that moment, made deterministic: the backend's coroutine is made before the
    reload (bound to the old worker) and started after it."""
    folder = copy_extension(tmp_path)
    extension = await load(manager, folder)
    late = extension._pyisolate_backend.call("version", (), {})
    set_version(folder, "v2")
    async with asyncio.timeout(DEADLINE):
        await extension.reload()  # the old worker is gone
        assert await late == "v2"


# -- other extensions calling it by name ----------------------------------------------------


async def load_peer(manager: ExtensionManager[Any]) -> Any:
    async with asyncio.timeout(DEADLINE):
        return await manager.load_extension(ExtensionConfig(name="peer_load", module_path=ext("peer_load")))


async def test_calls_by_name_from_another_extension_follow_reloads_with_none_failing(manager, tmp_path):
    folder = copy_extension(tmp_path)
    extension = await load(manager, folder)
    peer = await load_peer(manager)
    first_pid = await extension.pid()
    assert await peer.call(NAME, "version") == "v1"
    reloads, rate = 5, 100
    async with asyncio.timeout(300):
        await peer.start(NAME, "version", rate)
        for generation in range(1, reloads + 1):
            set_version(folder, f"v{generation + 1}")
            await extension.reload()
        report = await peer.finish(f"v{reloads + 1}")  # once the load reached the newest code
    assert report["failed"] == 0, f"{report['failed']} of {report['sent']} calls by name failed: {report['failures']}"
    assert report["answered"] == report["sent"]
    assert len(report["answers"]) >= 3  # the load ran through the reloads, answered by several generations
    assert f"v{reloads + 1}" in report["answers"]  # and reached the newest code by name
    assert not alive(first_pid)  # generation 0, whose actor held the name itself, is gone
    assert await peer.call(NAME, "version") == f"v{reloads + 1}"


async def test_an_extension_loaded_after_a_reload_reaches_the_new_worker_by_name(manager, tmp_path):
    folder = copy_extension(tmp_path)
    extension = await load(manager, folder)
    set_version(folder, "v2")
    async with asyncio.timeout(DEADLINE):
        await extension.reload()  # generation 0 is gone: the name is served by "reloadable@1"
    peer = await load_peer(manager)  # it learns where the name points as it joins
    assert await peer.call(NAME, "version") == "v2"
    assert await peer.call(NAME, "pid") == await extension.pid()


async def test_a_call_by_name_running_on_the_old_worker_finishes_there(manager, tmp_path):
    folder = copy_extension(tmp_path)
    seen = Seen(manager)
    extension = await load(manager, folder)
    peer = await load_peer(manager)
    gate = await extension.gate()
    async with asyncio.timeout(DEADLINE):
        held = asyncio.ensure_future(peer.call(NAME, "hold"))  # another extension's call, by name
        old_pid = await seen.nth("holding")
        set_version(folder, "v2")
        reloading = asyncio.ensure_future(extension.reload())
        await seen.nth("pyisolate.reload.switched")
        assert await peer.call(NAME, "version") == "v2"  # its new calls: the new worker
        assert not held.done() and not reloading.done()  # the old worker still serves the held one
        assert await gate.open() == "v1"
        assert await held == "v1"
        await reloading
    assert not alive(old_pid)
    assert (await seen.nth("pyisolate.reload.finished"))["drained"] is True


async def test_a_reloaded_extension_that_is_stopped_frees_its_name(manager, tmp_path):
    folder = copy_extension(tmp_path)
    extension = await load(manager, folder)
    peer = await load_peer(manager)
    set_version(folder, "v2")
    async with asyncio.timeout(DEADLINE):
        await extension.reload()
        assert await peer.call(NAME, "version") == "v2"
        await extension.stop()
        with pytest.raises(pyisolate.UnroutableError, match=f"'{NAME}'"):
            await peer.call(NAME, "version")
        set_version(folder, "v3, fresh")  # another size: a fresh load keeps compiled files it can trust
        again = await load(manager, folder)  # a fresh extension under the name: generation 0 again
        assert await peer.call(NAME, "version") == "v3, fresh"
        assert await peer.call(NAME, "pid") == await again.pid()
