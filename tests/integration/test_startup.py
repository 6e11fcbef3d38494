"""What the start-up shortcuts must not change: extension code sees a normal interpreter, the
runtime directory is only ever one that exists, and loading does its file work off the loop."""

from __future__ import annotations

import asyncio
import shutil
import sys
import textwrap
from pathlib import Path
from types import FrameType

import pyisolate._envs
from pyisolate._envs.runtime import runtime_dir
from tests.support import ext

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


def test_runtime_dir_is_built_once_and_again_when_removed(tmp_path: Path) -> None:
    built = runtime_dir(tmp_path / "a")
    assert runtime_dir(tmp_path / "a") == built  # the links are known: no scan, no rebuild
    shutil.rmtree(built)
    assert runtime_dir(tmp_path / "a") == built and built.is_dir()  # gone: built again
    assert runtime_dir(tmp_path / "b") == tmp_path / "b" / ".runtime" / built.name  # same links, other root


#: C functions that touch the file system or wait on it (``Path.resolve`` is lstat and readlink).
FILE_CALLS = frozenset({
    "open", "stat", "lstat", "readlink", "access", "utime", "fsync", "fdatasync", "mkdir", "replace", "rename",
    "unlink", "rmdir", "symlink", "listdir", "scandir", "flock", "lockf", "mkstemp",
})  # fmt: skip
ENVS = str(Path(pyisolate._envs.__file__).parent)


class FileWorkOnThisThread:
    """A profile hook on the calling thread (the loop's) that records every call of a file
    function (``os.stat``, ``open``, ``fcntl.flock``...) made, at any depth, by code of
    ``pyisolate._envs``."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __enter__(self) -> FileWorkOnThisThread:
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)

    def _hook(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "c_call" or getattr(arg, "__name__", None) not in FILE_CALLS:
            return
        if getattr(arg, "__module__", None) not in ("posix", "io", "fcntl"):
            return
        where = frame.f_code.co_filename
        if where.endswith("subprocess.py") or where.startswith("<frozen importlib"):
            return  # spawning uv opens /dev/null; a module's first import: once per process
        caller: FrameType | None = frame
        while caller is not None:
            if caller.f_code.co_filename.startswith(ENVS):
                self.seen.append(f"{getattr(arg, '__name__', arg)} from {caller.f_code.co_name}()")
                return
            caller = caller.f_back


async def test_loading_extensions_does_no_file_work_on_the_loop(tmp_path: Path) -> None:
    """Twenty extensions loading at once blocked the host's loop for over a second: resolving
    symlinks, reading markers, stat, fsync. Each happens in a thread now; the loop's own thread
    makes no file call from pyisolate._envs while two extensions build their venvs (cold) and
    while they load again (warm), at once."""
    from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

    config = ExtensionManagerConfig(venv_root_path=tmp_path / "venvs")
    configs = [ExtensionConfig(name=name, module_path=ext("ok")) for name in ("files-a", "files-b")]
    for start in ("cold", "warm"):
        async with ExtensionManager(ExtensionBase, config) as manager:
            with FileWorkOnThisThread() as probe:
                async with asyncio.timeout(180):
                    loaded = await manager.load_extensions(configs)
            assert sorted(loaded) == ["files-a", "files-b"]
            assert probe.seen == [], f"{start}: file work on the loop: {probe.seen}"

