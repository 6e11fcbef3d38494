"""What the start-up shortcuts must not change: extension code sees a normal interpreter, and a
cached runtime directory is only ever one that exists for the current package listing."""

from __future__ import annotations

import asyncio
import shutil
import textwrap
from pathlib import Path

import pytest

from pyisolate._envs import runtime as _runtime
from pyisolate._envs.runtime import cached_runtime_dir, runtime_dir

GC_PROBE = textwrap.dedent(
    """
    import gc

    from pyisolate import ExtensionBase

    AT_IMPORT = gc.isenabled()


    class Probe(ExtensionBase):
        async def gc_enabled(self):
            return [AT_IMPORT, gc.isenabled()]
    """
)


async def test_extension_code_runs_with_the_garbage_collector_on(manager, tmp_path: Path) -> None:
    from pyisolate import ExtensionConfig

    probe = tmp_path / "gc_probe.py"
    probe.write_text(GC_PROBE)
    async with asyncio.timeout(120):
        extension = await manager.load_extension(ExtensionConfig(name="gc-probe", module_path=probe))
        assert await extension.gc_enabled() == [True, True]


def test_cached_runtime_dir_is_only_a_built_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = runtime_dir(tmp_path / "a")
    assert cached_runtime_dir(tmp_path / "a") == built
    assert cached_runtime_dir(tmp_path / "b") is None  # same links, but not built there
    shutil.rmtree(built)
    assert cached_runtime_dir(tmp_path / "a") is None
    assert runtime_dir(tmp_path / "a") == built
    stamp = _runtime._listing_stamp()
    monkeypatch.setattr(_runtime, "_listing_stamp", lambda: (stamp[0], stamp[1] + 1))
    assert cached_runtime_dir(tmp_path / "a") is None  # pyisolate's listing changed: scan again
