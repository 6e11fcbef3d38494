"""The pytest plugin, used as an extension author would: a generated test run in a subprocess."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

MANIFEST = '''
[project]
name = "tiny-ext"
dependencies = []

[tool.pyisolate]
env = { TINY_FROM = "manifest" }
'''

TINY = '''
import os
import sys

from pyisolate import ExtensionBase


class Tiny(ExtensionBase):
    def add(self, a, b):
        return a + b

    def pid(self):
        return os.getpid()

    def executable(self):
        return sys.executable

    def env(self, name):
        return os.environ.get(name)
'''

# Async and sync fixtures, the manifest and an override; each worker must be gone after its test.
AUTHOR_TESTS = '''
import asyncio
import os
import pathlib

import pytest

HERE = pathlib.Path(__file__).parent
PIDS = {}


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.asyncio
async def test_async_fixture(pyisolate_extension, pyisolate_venv_root):
    async with asyncio.timeout(120):
        ext = await pyisolate_extension(HERE / "tiny")
        assert await ext.add(2, 3) == 5
        assert await ext.env("TINY_FROM") == "manifest"
        assert (await ext.executable()).startswith(str(pyisolate_venv_root))
        PIDS["async"] = await ext.pid()
    assert PIDS["async"] != os.getpid()
    assert not gone(PIDS["async"])


def test_async_worker_stopped_at_teardown():
    assert gone(PIDS["async"])


def test_sync_fixture(pyisolate_sync_extension, pyisolate_venv_root):
    ext = pyisolate_sync_extension(HERE / "tiny", name="tiny_sync", env={"TINY_FROM": "override"})
    assert ext.add(2, 3) == 5
    assert ext.env("TINY_FROM") == "override"
    assert ext.executable().startswith(str(pyisolate_venv_root))
    PIDS["sync"] = ext.pid()
    assert not gone(PIDS["sync"])


def test_sync_worker_stopped_at_teardown():
    assert gone(PIDS["sync"])
'''


def _ini(pytester: pytest.Pytester, mode: str, extra: str = "") -> None:
    pytester.makeini(
        textwrap.dedent(
            f"""
            [pytest]
            asyncio_mode = {mode}
            asyncio_default_fixture_loop_scope = function
            filterwarnings = error
            timeout = 180
            {extra}
            """
        )
    )


@pytest.mark.venv
@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_fixtures_load_an_extension_dir_and_stop_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, venv_root: Path, mode: str
) -> None:
    tiny = pytester.mkpydir("tiny")
    (tiny / "__init__.py").write_text(TINY)
    (tiny / "pyproject.toml").write_text(MANIFEST)
    pytester.makepyfile(test_author=AUTHOR_TESTS)
    if mode == "auto":  # the ini option names the venv root
        monkeypatch.delenv("PYISOLATE_TEST_VENVS", raising=False)
        _ini(pytester, mode, f"pyisolate_venv_root = {venv_root}")
    else:  # the environment variable does, and wins over the ini option
        monkeypatch.setenv("PYISOLATE_TEST_VENVS", str(venv_root))
        _ini(pytester, mode, f"pyisolate_venv_root = {pytester.path / 'unused'}")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=240)

    result.assert_outcomes(passed=4)
    assert (venv_root / "tiny-ext").is_dir() and (venv_root / "tiny_sync").is_dir()
    assert not (pytester.path / "unused").exists()


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_uses_it(pyisolate_sync_extension):\n    pass\n")

    result = pytester.runpytest_subprocess("-p", "no:pyisolate", "-p", "no:cacheprovider", timeout=120)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'pyisolate_sync_extension' not found*"])


def test_async_fixture_without_pytest_asyncio_says_what_to_install(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_uses_it(pyisolate_extension):\n    pass\n")

    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider", timeout=120)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pyisolate_extension fixture is async and needs pytest-asyncio*"])


def test_plugin_loads_by_module_name_without_autoload(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As docs/guides/testing.md says; pyisolate's plugin first, which must not import
    # pytest-asyncio's plugin before pytest registers it (a warning, an error here).
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n")
    pytester.makepyfile(
        """
        import pytest
        from pyisolate.pytest_plugin import ExtensionFactory

        @pytest.mark.asyncio
        async def test_fixture_is_there(pyisolate_extension):
            assert isinstance(pyisolate_extension, ExtensionFactory)
        """
    )

    result = pytester.runpytest_subprocess(
        "-p", "pyisolate.pytest_plugin", "-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider", timeout=120
    )

    result.assert_outcomes(passed=1)
