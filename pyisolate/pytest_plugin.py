"""pytest plugin: load an extension directory in isolation, as it will run, from a test.

Installed with pyisolate and loaded by pytest through the ``pytest11`` entry point named
``pyisolate`` (disable it with ``-p no:pyisolate``). Fixtures, all prefixed ``pyisolate_``:

- ``pyisolate_extension``: async factory. ``ext = await pyisolate_extension(path, **overrides)``
  reads the directory's manifest (``ExtensionConfig.from_path``), builds its venv with uv,
  starts its worker and returns the ready ``Extension``.
  Needs pytest-asyncio; its manager is stopped when the test ends.
- ``pyisolate_sync_extension``: the same for plain ``def`` tests; returns a blocking handle.
- ``pyisolate_manager_config``: the ``ExtensionManagerConfig`` both use; override it in a
  conftest to change timeouts and the like.
- ``pyisolate_extension_type``: the ``ExtensionBase`` subclass given to the manager.
- ``pyisolate_venv_root``: session-wide folder of the extensions' venvs. A temporary folder,
  unless the ``PYISOLATE_TEST_VENVS`` environment variable or the ``pyisolate_venv_root`` ini
  option names one to keep between runs (the variable wins).

Importing this module imports neither the host machinery (manager, broker) nor pytest-asyncio:
pytest loads it in every run of every project where pyisolate is installed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._base import ExtensionBase
    from ._config import ExtensionManagerConfig
    from ._host import Extension, ExtensionManager, SyncExtensionManager

__all__ = ["ExtensionFactory", "SyncExtensionFactory"]

VENV_ROOT_ENV = "PYISOLATE_TEST_VENVS"
VENV_ROOT_INI = "pyisolate_venv_root"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        VENV_ROOT_INI,
        help=(
            "folder that keeps the venvs of extensions loaded by pyisolate's fixtures between runs "
            f"(relative to the rootdir; the {VENV_ROOT_ENV} environment variable overrides it); "
            "default: a fresh temporary folder per session"
        ),
        default="",
    )


class ExtensionFactory:
    """The ``pyisolate_extension`` fixture: ``await factory(path, **overrides)`` loads one extension.

    Every extension it loads belongs to one ``ExtensionManager`` (``factory.manager``), which
    the fixture stops when the test ends, workers included.
    """

    def __init__(self, manager: ExtensionManager[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.manager = manager
        self._loop = loop

    async def __call__(self, path: str | os.PathLike[str], **overrides: Any) -> Extension:
        """Load the extension directory ``path`` in its own venv and process; wait until it is ready.

        Args:
            path: The extension's directory (or ``.py`` file).
            **overrides: ``ExtensionConfig`` fields that replace what the directory's
                ``pyproject.toml`` declares (see ``ExtensionConfig.from_path``).

        Returns:
            The ready ``Extension``: ``await ext.method(...)`` calls it.

        Raises:
            RuntimeError: called on another event loop than the fixture's.
            ConfigError: the manifest or an override is invalid.
            TypeError: an override is not an ExtensionConfig field.
            PyisolateError: the extension failed to load (venv build, import, start-up).
        """
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "pyisolate_extension was called on another event loop than the one its fixture runs on; "
                "give the test the fixture's loop scope (function by default), or set "
                "asyncio_default_fixture_loop_scope to the tests' loop scope"
            )
        from ._config import ExtensionConfig

        return await self.manager.load_extension(ExtensionConfig.from_path(path, **overrides))


class SyncExtensionFactory:
    """The ``pyisolate_sync_extension`` fixture: ``factory(path, **overrides)`` loads one extension.

    It returns a blocking handle whose methods return results. The extensions belong to one
    ``SyncExtensionManager`` (``factory.manager``), stopped when the test ends.
    """

    def __init__(self, manager: SyncExtensionManager) -> None:
        self.manager = manager

    def __call__(self, path: str | os.PathLike[str], **overrides: Any) -> Any:
        """Load the extension directory ``path`` and wait until it is ready; see ExtensionFactory."""
        from ._config import ExtensionConfig

        return self.manager.load_extension(ExtensionConfig.from_path(path, **overrides))


@pytest.fixture(scope="session")
def pyisolate_venv_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of every venv built by pyisolate's fixtures in this session."""
    configured = os.environ.get(VENV_ROOT_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    configured = str(request.config.getini(VENV_ROOT_INI))
    if configured:
        return (request.config.rootpath / Path(configured).expanduser()).absolute()
    return tmp_path_factory.mktemp("pyisolate-venvs")


@pytest.fixture
def pyisolate_extension_type() -> type[ExtensionBase]:
    """The extension type given to the manager: ``ExtensionBase``; override for a host's own base."""
    from ._base import ExtensionBase

    return ExtensionBase


@pytest.fixture
def pyisolate_manager_config(pyisolate_venv_root: Path) -> ExtensionManagerConfig:
    """The manager settings of pyisolate's fixtures; override to change timeouts or progress."""
    from ._config import ExtensionManagerConfig

    return ExtensionManagerConfig(venv_root_path=pyisolate_venv_root)


async def _extension_factory(
    pyisolate_manager_config: ExtensionManagerConfig, pyisolate_extension_type: type[ExtensionBase]
) -> AsyncIterator[ExtensionFactory]:
    """Load extension directories in isolation: ``ext = await pyisolate_extension(path, **overrides)``."""
    from ._host import ExtensionManager

    async with ExtensionManager(pyisolate_extension_type, pyisolate_manager_config) as manager:
        yield ExtensionFactory(manager, asyncio.get_running_loop())


def _needs_pytest_asyncio() -> None:
    """Stands in for ``pyisolate_extension`` where pytest-asyncio is not installed or not enabled."""
    pytest.fail(
        "the pyisolate_extension fixture is async and needs pytest-asyncio, installed (pip install "
        "pytest-asyncio) and enabled; plain def tests can use pyisolate_sync_extension instead",
        pytrace=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    # pyisolate_extension is declared here, not at import: importing pytest_asyncio while
    # pytest loads plugins would import its plugin module before pytest can register it for
    # assertion rewriting (a warning, an error under filterwarnings=error), and only now is it
    # known whether pytest-asyncio is enabled. pytest_asyncio.fixture, not pytest.fixture:
    # strict mode runs only async fixtures marked so.
    plugin = sys.modules.get("pytest_asyncio.plugin")
    fixture: object
    if plugin is not None and config.pluginmanager.is_registered(plugin):
        from pytest_asyncio import fixture as asyncio_fixture

        fixture = asyncio_fixture(name="pyisolate_extension")(_extension_factory)
    else:
        fixture = pytest.fixture(name="pyisolate_extension")(_needs_pytest_asyncio)
    holder = types.ModuleType(f"{__name__}.asyncio_fixtures")  # pytest reads fixtures off modules
    holder.__dict__["pyisolate_extension"] = fixture
    config.pluginmanager.register(holder, "pyisolate-asyncio")


@pytest.fixture
def pyisolate_sync_extension(
    pyisolate_manager_config: ExtensionManagerConfig, pyisolate_extension_type: type[ExtensionBase]
) -> Iterator[SyncExtensionFactory]:
    """Load extension directories in isolation from plain tests: ``ext = pyisolate_sync_extension(path)``."""
    from ._host import SyncExtensionManager

    with SyncExtensionManager(pyisolate_extension_type, pyisolate_manager_config) as manager:
        yield SyncExtensionFactory(manager)
