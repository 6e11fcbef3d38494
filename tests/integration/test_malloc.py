"""The user's malloc settings (MALLOC_*) reach workers, spawned or forked, and take effect there.

Workers keep glibc's own behaviour otherwise: a freed large buffer stays in the heap for the
next one, which a node returning a fresh image every call reuses (fixing the mmap threshold
made every image fault in anew: the node-pack workflow ran 1.4x slower); memory stays flat
under use all the same (``benchmarks/workflow.py``: USS after 300 workflows against 20).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

pytest.importorskip("torch")

from tests.support import ext  # noqa: E402

IMAGE = 12 << 20


@pytest.mark.parametrize("fork_server", [True, False], ids=["forked", "spawned"])
async def test_the_users_malloc_settings_reach_the_worker_and_take_effect(venv_root: Path, monkeypatch,
                                                                          fork_server: bool):
    """MALLOC_MMAP_THRESHOLD_ set by the user: buffers from 1 MiB up go back when freed, so two
    12 MiB buffers made and freed in turn leave (almost) nothing behind."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    config = ExtensionManagerConfig(venv_root_path=venv_root, fork_server=fork_server)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(180):
            t = await manager.load_extension(ExtensionConfig(name="tensors", module_path=ext("tensors"),
                                                             share_torch=True))
        async with asyncio.timeout(60):
            assert await t.malloc_env() == {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_ARENA_MAX": "2"}
            for _ in range(3):
                assert await t.rss_growth_after_two_buffers(IMAGE) < IMAGE // 4
