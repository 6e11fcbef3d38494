"""Workers give large freed buffers back to the system, unless the user set malloc up (their
MALLOC_* settings reach the worker and win)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

pytest.importorskip("torch")

from tests.support import ext  # noqa: E402

IMAGE = 12 << 20


async def load(venv_root: Path, manager: ExtensionManager):
    async with asyncio.timeout(180):
        return await manager.load_extension(ExtensionConfig(name="tensors", module_path=ext("tensors"),
                                                            share_torch=True))


async def test_a_worker_keeps_no_freed_12_mib_buffer(venv_root: Path):
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        t = await load(venv_root, manager)
        async with asyncio.timeout(60):
            assert (await t.malloc_state())[0] is True
            for _ in range(3):
                assert await t.rss_growth_after_two_buffers(IMAGE) < IMAGE // 4


async def test_the_users_malloc_settings_reach_the_worker_and_win(venv_root: Path, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 << 20))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        t = await load(venv_root, manager)
        async with asyncio.timeout(60):
            tuned, env = await t.malloc_state()
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_ARENA_MAX": "2"}
    assert tuned is False  # theirs holds: ours would have overridden it
