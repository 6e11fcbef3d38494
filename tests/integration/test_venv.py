"""Real venvs built with uv (network to PyPI for small packages), and the shared runtime dir."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import zmq

import pyisolate
import pyisolate.broker.protocol
import pyisolate.workers
from pyisolate._envs.runtime import runtime_dir
from pyisolate._envs.progress import ProgressEvent
from pyisolate._envs.venv import ensure_venv
from pyisolate.errors import EnvironmentBuildError

pytestmark = pytest.mark.venv

DEADLINE = 120.0
SIX = ["six==1.16.0"]
MISSING = "pyisolate-no-such-package-xyz==9.9"


def _steps(events: list[ProgressEvent]) -> list[str]:
    return [event.step for event in events]


def _build_steps(events: list[ProgressEvent]) -> list[str]:
    """The steps of a build with dependencies, repeats folded (uv repeats 'downloading' per package)."""
    steps = _steps(events)
    return [step for i, step in enumerate(steps) if i == 0 or steps[i - 1] != step]


# What uv's output yields: "installing" only when uv prepared something (not all from its cache).
BUILT = (["creating", "resolving", "downloading", "done"],
         ["creating", "resolving", "downloading", "installing", "done"])


async def _ensure(
    root: Path, name: str, deps: list[str], events: list[ProgressEvent]
) -> Path:
    return await ensure_venv(venv_root=root, name=name, dependencies=deps, progress=events.append)


def _run(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-I", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def _children() -> set[str]:
    """Return 'pid state' of every live or zombie child of this process."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.add(f"{entry} {fields[0]}")
    return found


def _site_packages(target: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return target / "lib" / version / "site-packages"


async def test_build_then_reuse_without_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[ProgressEvent] = []
    async with asyncio.timeout(DEADLINE):
        python = await _ensure(tmp_path, "ext", SIX, events)
    assert python == tmp_path / "ext" / "bin" / "python"
    assert _build_steps(events) in BUILT
    assert events[1].detail == "six==1.16.0"
    assert (events[2].detail, events[2].packages) == ("1 package", 1)  # uv's "Resolved 1 package"
    assert (events[-1].detail, events[-1].packages) == ("1 package", 1)  # uv's "Installed 1 package"
    assert all(a.elapsed <= b.elapsed for a, b in zip(events, events[1:]))
    result = _run(python, "import six; print(six.__version__)")
    assert result.stdout.strip() == "1.16.0", result.stderr

    marker = tmp_path / "ext" / ".pyisolate-ready.json"
    mtime = marker.stat().st_mtime_ns
    listing = sorted(os.listdir(_site_packages(tmp_path / "ext")))

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("reuse must not start a subprocess")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_subprocess)
    events.clear()
    async with asyncio.timeout(DEADLINE):
        again = await _ensure(tmp_path, "ext", SIX, events)
    assert again == python
    assert _steps(events) == ["reused"]
    assert marker.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(_site_packages(tmp_path / "ext"))) == listing


async def test_changed_dependencies_rebuild(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    async with asyncio.timeout(DEADLINE):
        python = await ensure_venv(venv_root=tmp_path, name="ext", dependencies=SIX)
        assert _run(python, "import six").returncode == 0
        await ensure_venv(venv_root=tmp_path, name="ext", dependencies=[], progress=events.append)
    assert _steps(events) == ["creating", "done"]
    assert events[-1].packages == 0
    result = _run(python, "import six")
    assert "ModuleNotFoundError" in result.stderr


async def test_cancel_during_install_kills_uv_and_cleans_up(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    children = _children()

    def on_progress(event: ProgressEvent) -> None:
        events.append(event)
        if event.step == "resolving":  # uv runs
            task.cancel()

    task = asyncio.create_task(
        ensure_venv(venv_root=tmp_path, name="ext", dependencies=SIX, progress=on_progress)
    )
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert _steps(events) == ["creating", "resolving", "failed"]
    assert events[-1].detail == "cancelled"
    assert _children() == children  # uv was killed and reaped
    assert not (tmp_path / "ext").exists()

    events.clear()
    async with asyncio.timeout(DEADLINE):
        python = await _ensure(tmp_path, "ext", SIX, events)
    assert _build_steps(events) in BUILT
    assert _run(python, "import six").returncode == 0


async def test_missing_package_fails_with_its_name(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    children = _children()
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(EnvironmentBuildError) as info:
            await _ensure(tmp_path, "ext", ["six", MISSING], events)
    error = info.value
    assert error.extension == "ext"
    assert error.packages == [MISSING]
    assert "pyisolate-no-such-package-xyz" in str(error)
    assert "'ext'" in str(error)
    assert error.output_tail.strip()
    assert _steps(events) == ["creating", "resolving", "failed"]  # uv found no solution
    assert events[-1].detail == error.output_tail
    assert not (tmp_path / "ext" / ".pyisolate-ready.json").exists()
    assert not (tmp_path / "ext").exists()
    assert _children() == children


async def test_different_extensions_build_concurrently(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(
            ensure_venv(venv_root=tmp_path, name="a", dependencies=SIX, progress=events.append),
            ensure_venv(venv_root=tmp_path, name="b", dependencies=[], progress=events.append),
        )
    order = [(event.extension, event.step) for event in events]
    first_done = min(order.index(("a", "done")), order.index(("b", "done")))
    assert order.index(("a", "creating")) < first_done
    assert order.index(("b", "creating")) < first_done


async def test_same_extension_concurrently_builds_once(tmp_path: Path) -> None:
    builder: list[ProgressEvent] = []
    waiter: list[ProgressEvent] = []
    async with asyncio.timeout(DEADLINE):
        first, second = await asyncio.gather(
            ensure_venv(venv_root=tmp_path, name="ext", dependencies=SIX, progress=builder.append),
            ensure_venv(venv_root=tmp_path, name="ext", dependencies=SIX, progress=waiter.append),
        )
    assert first == second
    if _steps(builder) == ["waiting", "reused"]:  # whichever opens the lock first (in a thread) builds
        builder, waiter = waiter, builder
    assert _build_steps(builder) in BUILT
    assert _steps(waiter) == ["waiting", "reused"]
    assert _run(first, "import six").returncode == 0


async def test_cancel_while_waiting_for_the_lock_leaks_no_lock(tmp_path: Path) -> None:
    (tmp_path / ".locks").mkdir()
    fd = os.open(tmp_path / ".locks" / "ext.lock", os.O_RDWR | os.O_CREAT, 0o600)
    cancelled: list[ProgressEvent] = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # stands for another process building "ext"

        def on_progress(event: ProgressEvent) -> None:
            cancelled.append(event)
            if event.step == "waiting":
                task.cancel()  # lands on the wait for the lock, the next await

        task = asyncio.create_task(
            ensure_venv(venv_root=tmp_path, name="ext", dependencies=[], progress=on_progress)
        )
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        os.close(fd)
    assert _steps(cancelled) == ["waiting", "failed"]
    events: list[ProgressEvent] = []
    async with asyncio.timeout(DEADLINE):  # would hang if the cancelled waiter kept the lock
        await ensure_venv(venv_root=tmp_path, name="ext", dependencies=[], progress=events.append)
    # The cancelled waiter's thread may still hold the lock for a moment once it is free (its
    # descriptor is closed by a callback on the loop): this build may wait for that, then builds.
    assert _steps(events) in (["creating", "done"], ["waiting", "creating", "done"])


async def test_runtime_dir_shares_only_the_runtime(tmp_path: Path) -> None:
    async with asyncio.timeout(DEADLINE):
        python = await ensure_venv(venv_root=tmp_path, name="ext", dependencies=[])
    runtime = runtime_dir(tmp_path)
    assert runtime_dir(tmp_path) == runtime
    assert {"pyisolate", "zmq", "msgpack"} <= set(os.listdir(runtime))
    code = (
        f"import os, sys; sys.path.append({str(runtime)!r})\n"
        "import pyisolate.broker.protocol, pyisolate.workers, zmq, msgpack\n"
        "for m in (pyisolate, pyisolate.broker.protocol, pyisolate.workers, zmq, msgpack):\n"
        "    print(os.path.realpath(m.__file__))\n"
        "print(zmq.zmq_version())\n"
        "try:\n"
        "    import numpy\n"
        "except ModuleNotFoundError:\n"
        "    print('no numpy')\n"
    )
    result = _run(python, code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = [
        os.path.realpath(str(m.__file__))
        for m in (pyisolate, pyisolate.broker.protocol, pyisolate.workers, zmq, msgpack)
    ]
    assert lines[:5] == expected
    assert lines[5] == zmq.zmq_version()
    assert lines[6] == "no numpy"


def test_runtime_dir_race_loser_discards_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner = runtime_dir(tmp_path)
    real_is_dir = Path.is_dir
    calls = {"n": 0}

    def first_lookup_misses(self: Path) -> bool:
        if self == winner and calls["n"] == 0:
            calls["n"] += 1
            return False  # pretend the other process had not finished when we looked
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", first_lookup_misses)
    assert runtime_dir(tmp_path) == winner
    assert os.listdir(tmp_path / ".runtime") == [winner.name]
