"""Discovery: extension folders and installed entry points, loaded together with load_extensions()."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

import pyisolate
from pyisolate import ConfigError, DiscoveryError, ExtensionLoadError, LoadExtensionsError

pytestmark = pytest.mark.venv

DEADLINE = 120.0

CODE = """\
from pyisolate import ExtensionBase


class Hello(ExtensionBase):
    def hello(self):
        return {tag!r}
"""


def _folder(root: Path, name: str, *, manifest: str | None = None, tag: str | None = None) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "__init__.py").write_text(CODE.format(tag=tag or name))
    if manifest is not None:
        (directory / "pyproject.toml").write_text(manifest)
    return directory


def _distribution(site: Path, dist: str, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution: importlib.metadata reads a *.dist-info folder."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[pyisolate.extensions]\n{lines}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site directory on sys.path, as if packages were installed there."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def test_a_directory_of_extension_folders(tmp_path: Path) -> None:
    root = tmp_path / "extensions"
    _folder(root, "b_code_only")
    _folder(root, "a_manifest", manifest='[project]\nname = "from-manifest"\ndependencies = ["six"]\n')
    _folder(root, ".hidden")
    (root / "__pycache__").mkdir()
    (root / "not_an_extension").mkdir()  # no __init__.py, no pyproject.toml
    (root / "loose.py").write_text("")
    configs = pyisolate.discover(root, entry_points=False)
    assert [(c.name, c.module_path.name, c.dependencies) for c in configs] == [
        ("from-manifest", "a_manifest", ("six",)),
        ("b_code_only", "b_code_only", ()),
    ]
    # Keyword arguments apply to every extension found, over its manifest.
    assert [c.isolated for c in pyisolate.discover(root, entry_points=False, isolated=False)] == [False, False]


def test_entry_points_are_found_without_importing_them(site: Path) -> None:
    _folder(site, "ep_package", manifest='[project]\ndependencies = ["six"]\n')
    nested = site / "ep_parent"
    nested.mkdir()
    (nested / "__init__.py").write_text("raise RuntimeError('the host imported an extension')\n")
    _folder(nested, "child")
    (site / "ep_single.py").write_text(CODE.format(tag="single"))
    _distribution(site, "ep_dist", {"ep-one": "ep_package", "ep-two": "ep_parent.child", "ep-three": "ep_single"})

    configs = {c.name: c for c in pyisolate.discover()}
    assert set(configs) == {"ep-one", "ep-two", "ep-three"}
    assert configs["ep-one"].module_path == site / "ep_package"
    assert configs["ep-one"].dependencies == ("six",)  # the package's own manifest
    assert configs["ep-two"].module_path == nested / "child"
    assert configs["ep-three"].module_path == site / "ep_single.py"
    assert not {"ep_package", "ep_parent", "ep_single"} & set(sys.modules)


def test_every_problem_is_reported_and_the_valid_rest_is_kept(tmp_path: Path, site: Path) -> None:
    root = tmp_path / "extensions"
    _folder(root, "dup")
    _folder(root, "fine")
    _folder(root, "bad", manifest="[tool.pyisolate]\nshare_torch = 1\n")
    _folder(site, "dup_package")
    _distribution(site, "dup_dist", {"dup": "dup_package", "gone": "no_such_module_xyz", "obj": "dup_package:Cls"})

    with pytest.raises(DiscoveryError) as info:
        pyisolate.discover(root)
    error = info.value
    assert isinstance(error, ConfigError)
    assert [c.name for c in error.configs] == ["fine"]  # both claimants of "dup" are dropped
    text = str(error)
    assert len(error.problems) == 4
    assert "[tool.pyisolate].share_torch" in text and str(root / "bad" / "pyproject.toml") in text
    assert "'dup' is used by 2 extensions" in text and str(root / "dup") in text and "dup_dist" in text
    assert "no module named 'no_such_module_xyz'" in text
    assert "'dup_package:Cls' must name a module or package" in text


def test_discover_refuses_a_missing_directory_and_per_extension_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        pyisolate.discover(tmp_path / "missing")
    with pytest.raises(TypeError, match="'name'"):
        pyisolate.discover(tmp_path, name="x")


async def test_load_extensions_keeps_the_good_and_reports_the_failed_together(
    tmp_path: Path, site: Path, manager: pyisolate.ExtensionManager
) -> None:
    root = tmp_path / "extensions"
    _folder(root, "disc_alpha")
    (_folder(root, "disc_broken") / "__init__.py").write_text("import no_such_module_for_pyisolate_tests\n")
    _folder(site, "disc_ep_pkg", tag="from an entry point")
    _distribution(site, "disc_dist", {"disc_ep": "disc_ep_pkg"})
    configs = pyisolate.discover(root)

    async with asyncio.timeout(DEADLINE):
        with pytest.raises(LoadExtensionsError) as info:
            await manager.load_extensions(configs)
        error = info.value
        assert list(error.loaded) == ["disc_alpha", "disc_ep"]
        assert list(error.failed) == ["disc_broken"]
        assert isinstance(error.failed["disc_broken"], ExtensionLoadError)
        assert "disc_broken" in str(error) and "1 of 3 extensions failed" in str(error)
        assert await error.loaded["disc_alpha"].hello() == "disc_alpha"
        assert await error.loaded["disc_ep"].hello() == "from an entry point"

        # The failed one was released: its name is free for a fixed config.
        (root / "disc_broken" / "__init__.py").write_text(CODE.format(tag="fixed"))
        loaded = await manager.load_extensions([pyisolate.ExtensionConfig.from_path(root / "disc_broken")])
        assert await loaded["disc_broken"].hello() == "fixed"
        assert await manager.load_extensions([]) == {}


async def test_load_extensions_checks_names_before_starting_anything(
    tmp_path: Path, manager: pyisolate.ExtensionManager
) -> None:
    one = pyisolate.ExtensionConfig.from_path(_folder(tmp_path, "disc_same"))
    with pytest.raises(ConfigError, match="two configs are named 'disc_same'"):
        await manager.load_extensions([one, one])
    async with asyncio.timeout(DEADLINE):
        await manager.load_extensions([one])
        with pytest.raises(ConfigError, match="already loaded"):
            await manager.load_extensions([pyisolate.ExtensionConfig.from_path(_folder(tmp_path, "other")), one])
    with pytest.raises(pyisolate.UnroutableError):  # "other" was not started by the refused call
        manager.get_actor("other")


async def test_except_star_selects_failures_by_type(tmp_path: Path, manager: pyisolate.ExtensionManager) -> None:
    good = pyisolate.ExtensionConfig.from_path(_folder(tmp_path, "star_good"))
    bad = pyisolate.ExtensionConfig.from_path(_folder(tmp_path, "star_bad"))
    (tmp_path / "star_bad" / "__init__.py").write_text("raise ValueError('broken on purpose')\n")
    caught = []
    async with asyncio.timeout(DEADLINE):
        try:
            await manager.load_extensions([good, bad])
        except* ExtensionLoadError as group:
            assert isinstance(group, LoadExtensionsError)
            caught.append(group)
    assert [type(e) for e in caught[0].exceptions] == [ExtensionLoadError]
    assert list(caught[0].loaded) == ["star_good"]


def test_the_sync_manager_loads_many_and_its_handles_block(tmp_path: Path, venv_root: Path) -> None:
    good = pyisolate.ExtensionConfig.from_path(_folder(tmp_path, "sync_good"))
    bad = pyisolate.ExtensionConfig.from_path(_folder(tmp_path, "sync_bad"))
    (tmp_path / "sync_bad" / "__init__.py").write_text("raise ValueError('broken on purpose')\n")
    config = pyisolate.ExtensionManagerConfig(venv_root_path=venv_root)
    with pyisolate.SyncExtensionManager(pyisolate.ExtensionBase, config) as manager:
        with pytest.raises(LoadExtensionsError) as info:
            manager.load_extensions([good, bad])
        assert info.value.loaded["sync_good"].hello() == "sync_good"  # a result, not an awaitable
        two = pyisolate.ExtensionConfig.from_path(tmp_path / "sync_good", name="sync_two")
        assert manager.load_extensions([two])["sync_two"].hello() == "sync_good"


async def test_cancelling_load_extensions_stops_what_it_started(
    tmp_path: Path, manager: pyisolate.ExtensionManager
) -> None:
    fifo = tmp_path / "importing"
    os.mkfifo(fifo)
    quick = pyisolate.ExtensionConfig.from_path(_folder(tmp_path, "cancel_quick"))
    stuck = _folder(tmp_path, "cancel_stuck")
    (stuck / "__init__.py").write_text(
        f"import os, threading\nos.open({str(fifo)!r}, os.O_WRONLY)\nthreading.Event().wait()\n"
    )
    async with asyncio.timeout(DEADLINE):
        task = asyncio.create_task(manager.load_extensions([quick, pyisolate.ExtensionConfig.from_path(stuck)]))
        reader = await asyncio.to_thread(os.open, fifo, os.O_RDONLY)  # returns once the import is under way
        os.close(reader)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for name in ("cancel_quick", "cancel_stuck"):
        with pytest.raises(pyisolate.UnroutableError):
            manager.get_actor(name)
