"""Host import paths: a worker imports the host application's own modules only from the folders
the host lists (``host_paths``), after its own packages, and may read them but never write them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionLoadError, ExtensionManager, ExtensionManagerConfig
from pyisolate.workers import confine
from tests.support import ext

HOSTAPP = ext("hostapp")
DENIED = ("PermissionError: errno 13", "PermissionError: errno 1")

needs_landlock = pytest.mark.skipif(
    not sys.platform.startswith("linux") or int(confine.probe()["landlock_abi"]) < 1,  # type: ignore[call-overload]
    reason="needs Landlock",
)


def _app(root: Path, name: str = "app", greeting: str = "hello from the host app") -> Path:
    """A folder of the host application holding ``hostapp_mod``, which no venv has."""
    folder = root / name
    folder.mkdir()
    (folder / "hostapp_mod.py").write_text(f"GREETING = {greeting!r}\n")
    return folder


async def test_an_extension_imports_host_code_only_from_the_folders_listed(venv_root: Path, tmp_path: Path) -> None:
    app = _app(tmp_path)
    async with asyncio.timeout(180), ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) \
            as manager:
        sealed = manager.load_extension(ExtensionConfig(name="hostapp", module_path=HOSTAPP))
        with pytest.raises(ExtensionLoadError, match="No module named 'hostapp_mod'"):
            await sealed
        await sealed.stop()  # its name is free again
        hostapp = await manager.load_extension(ExtensionConfig(name="hostapp", module_path=HOSTAPP, host_paths=[app]))
        assert await hostapp.greeting() == "hello from the host app"
        assert await hostapp.origin() == str(app / "hostapp_mod.py")
        path = await hostapp.sys_path()
        assert path[-1] == str(app)
        runtime = path.index(await hostapp.runtime())
        venv = next(i for i, entry in enumerate(path) if entry.startswith(str(venv_root / "hostapp")))
        assert venv < runtime < path.index(str(app)), path  # its own packages first, then pyisolate's, then the host's


async def test_the_managers_folders_come_first_then_the_extensions(venv_root: Path, tmp_path: Path) -> None:
    shared, own = _app(tmp_path, "shared", "from the manager's folder"), _app(tmp_path, "own", "from its own folder")
    config = ExtensionManagerConfig(venv_root_path=venv_root, host_paths=[shared])
    async with asyncio.timeout(180), ExtensionManager(ExtensionBase, config) as manager:
        hostapp = await manager.load_extension(ExtensionConfig(name="hostapp", module_path=HOSTAPP, host_paths=[own]))
        assert (await hostapp.sys_path())[-2:] == [str(shared), str(own)]
        assert await hostapp.greeting() == "from the manager's folder"


@needs_landlock
async def test_a_confined_worker_reads_the_host_folders_but_cannot_write_them(venv_root: Path, tmp_path: Path) -> None:
    app = _app(tmp_path)
    config = ExtensionManagerConfig(venv_root_path=venv_root, host_paths=[app])  # the default sandbox: preferred
    async with asyncio.timeout(180), ExtensionManager(ExtensionBase, config) as manager:
        hostapp = await manager.load_extension(ExtensionConfig(name="hostapp", module_path=HOSTAPP))
        assert await hostapp.greeting() == "hello from the host app"  # read: imported
        assert await hostapp.plant() in DENIED
    assert not (app / "planted.py").exists()


async def test_a_missing_host_module_the_host_has_loaded_names_its_folder(
    venv_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _app(tmp_path)
    monkeypatch.syspath_prepend(str(app))
    monkeypatch.delitem(sys.modules, "hostapp_mod", raising=False)
    __import__("hostapp_mod")  # the host has imported it; the extension was not given its folder
    async with asyncio.timeout(180), ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) \
            as manager:
        with pytest.raises(ExtensionLoadError, match=rf"host_paths=\[{str(app)!r}\]"):
            await manager.load_extension(ExtensionConfig(name="hostapp", module_path=HOSTAPP))
    monkeypatch.delitem(sys.modules, "hostapp_mod")
