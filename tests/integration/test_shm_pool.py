"""The pool of shared-memory segments, through real workers: fresh tensors reuse warm segments,
and a segment is never reused while any other actor still holds it, whatever a peer sends."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import numpy
import pytest

import pyisolate
from pyisolate import ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig
from pyisolate._host.sandbox.limits import mechanisms
from pyisolate._wire import shm as _shm

torch = pytest.importorskip("torch")

from tests.support import ext  # noqa: E402

MIB = 1 << 20
N = MIB  # float32 elements: 4 MiB tensors, pooled


@pytest.fixture
async def manager(venv_root: Path):
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as m:
        yield m
    assert _shm.stats()["pool_free_bytes"] == 0  # the manager's close let go of its free segments


async def load(manager, name, path="tensors", **kw):
    async with asyncio.timeout(180):
        return await manager.load_extension(ExtensionConfig(name=name, module_path=ext(path), share_torch=True, **kw))


def inode(t) -> tuple[int, int]:
    segment = _shm.find(t.untyped_storage().data_ptr())
    assert segment is not None, "not in shared memory"
    return segment.mapping.inode


async def test_fresh_tensors_returned_again_and_again_reuse_warm_segments_and_mappings(manager):
    t = await load(manager, "tensors")
    inodes = set()
    async with asyncio.timeout(120):
        for i in range(20):
            got = await t.make_filled(N, i)
            assert (float(got.min()), float(got.max())) == (i, i)
            inodes.add(inode(got))
            # Released when this step of the task ends (asyncio's handle that resumed it holds
            # the answer until then): after the next call has left, so the worker may use a
            # second segment while the first comes back.
            del got
            assert _shm.mapped() <= 2  # nothing new mapped here: the worker's one or two segments, again
        stats = await t.shm_stats()
    assert len(inodes) <= 2
    assert stats["pool_made"] == len(inodes) and stats["pool_hits"] == 20 - len(inodes)
    assert _shm.stats()["cached"] == len(inodes)  # our mappings stay, unleased, for the next receipt


async def test_a_segment_is_not_reused_while_the_host_still_holds_a_view_of_it(manager):
    t = await load(manager, "tensors")
    async with asyncio.timeout(120):
        kept = (await t.make_filled(N, 1))[10:]  # a view keeps it, as the whole tensor would
        for i in range(2, 6):
            other = await t.make_filled(N, i)
            assert inode(other) != inode(kept)
            del other
            await t.pinned()
        assert (float(kept.min()), float(kept.max())) == (1, 1)  # never overwritten
        made = (await t.shm_stats())["pool_made"]
        held = inode(kept)
        del kept
        await t.pinned()  # released now: the next fresh tensor may take it
        again = await t.make_filled(N, 7)
        assert (await t.shm_stats())["pool_made"] == made
        assert held in {inode(again)} | {inode(await t.make_filled(N, 8))}


async def test_a_pooled_segment_going_on_to_a_third_actor_goes_as_a_copy_and_back_to_its_owners_pool(manager):
    """A chain of nodes (a -> host -> b): passed on, a's segment could never be reused (b maps
    it), so a would make and fault a new one for every value. The host sends b a copy in a
    segment of its own instead, and a's segment comes back to a's pool."""
    a = await load(manager, "a")
    b = await load(manager, "b")
    async with asyncio.timeout(120):
        x = await a.make_filled(N, 1)
        held = inode(x)
        await b.keep_also(x)
        assert inode(x) != held  # x moved, once, into the host's own segment
        made = (await a.shm_stats())["pool_made"]
        del x
        await a.pinned()  # the host's release of a's segment has reached a
        again = await a.make_filled(N, 2)
        assert (await a.shm_stats())["pool_made"] == made  # a's segment came back and was reused
        assert (float(again.min()), float(again.max())) == (2, 2)
        assert await b.kept_ranges() == [(1.0, 1.0)]  # b's copy is not a's segment: never overwritten


async def test_a_segment_shared_on_to_a_third_actor_is_kept_until_it_lets_go_and_then_never_reused(manager):
    """Above FORWARD_COPY_MAX a segment is passed on (a copy would cost more than a new segment)."""
    a = await load(manager, "a")
    b = await load(manager, "b")
    big = _shm.FORWARD_COPY_MAX // 4 + MIB  # float32 elements
    async with asyncio.timeout(120):
        x = await a.make_filled(big, 1)
        await b.keep_also(x)  # the host shares a's segment on, with b
        held = inode(x)
        del x
        for i in range(2, 5):  # the host let go, b did not: a must not reuse it
            y = await a.make_filled(big, i)
            assert inode(y) != held
            del y
        assert await b.kept_ranges() == [(1.0, 1.0)]
        before = await a.shm_stats()
        await b.drop_all()  # b lets go; the host's release tells a the segment was shared on
        await a.pinned()
        await b.pinned()
        after = await a.shm_stats()
        assert after["mapped"] == before["mapped"] - 1  # a unmapped it: seen by b, never a's to reuse
        assert after["pool_bytes"] == before["pool_bytes"] - _shm.class_of(big * 4)


async def test_a_peer_releasing_early_twice_or_for_others_cannot_make_the_host_reuse_what_another_holds(manager):
    hostile = await load(manager, "hostile", "hostile_shm")
    honest = await load(manager, "honest")
    to_honest, to_hostile = set(), set()
    async with asyncio.timeout(180):
        for i in range(6):
            mine = torch.full((N,), float(i))  # fresh: each takes a segment of the host's pool
            await honest.keep_also(mine)
            to_honest.add(inode(mine))
            theirs = torch.full((N,), 100.0 + i)
            key = _shm.ack_key(_shm.find(mine.untyped_storage().data_ptr()).mapping.own_id)
            released = await hostile.release_early(theirs, 5, [key])  # ours and the honest one's key
            assert released
            to_hostile.add(inode(theirs))
            del mine, theirs
            gc.collect()
        assert to_honest.isdisjoint(to_hostile)  # memory the hostile one saw never went to the honest one
        assert await honest.kept_ranges() == [(float(i), float(i)) for i in range(6)]
        assert _shm.stats()["pool_bytes"] <= _shm.pool.limit
        assert (await hostile.shm_stats())["mapped"] >= 1  # it kept what it released
        # Named back by our own id once released: no longer its to name, while we use it or
        # once it is free in the pool.
        theirs = torch.full((N,), 7.0)
        await hostile.release_early(theirs, 1)
        ours = _shm.find(theirs.untyped_storage().data_ptr()).mapping.own_id
        with pytest.raises(pyisolate.ProtocolError, match="not one of ours that 'hostile' holds"):
            await hostile.name_back(ours, N)
        del theirs
        with pytest.raises(pyisolate.ProtocolError, match="not one of ours that 'hostile' holds"):
            await hostile.name_back(ours, N)


async def test_a_peer_that_never_releases_cannot_exhaust_the_pool(venv_root: Path):
    config = ExtensionManagerConfig(venv_root_path=venv_root, shm_pool_bytes=16 * MIB)
    async with ExtensionManager(ExtensionBase, config) as manager:
        hostile = await load(manager, "hostile", "hostile_shm")
        honest = await load(manager, "honest")
        async with asyncio.timeout(180):
            for i in range(8):
                await hostile.keep(torch.full((N,), float(i)))  # kept for ever
            stats = _shm.stats()
            assert stats["pool_bytes"] <= 16 * MIB and stats["pool_outside"] >= 4
            for i in range(3):  # others are served all the same, from segments of their own
                await honest.keep_also(torch.full((N,), float(i)))
            assert await honest.kept_ranges() == [(float(i), float(i)) for i in range(3)]
            assert (await honest.shm_stats())["pool_limit"] == 16 * MIB  # the worker's own bound
            await hostile.stop()  # its pins go with it, and what it saw is never reused
            gc.collect()
            assert _shm.stats()["pool_bytes"] == 0


async def test_shared_empty_tensors_travel_with_no_copy_both_ways(manager):
    t = await load(manager, "tensors")
    async with asyncio.timeout(120):
        x = pyisolate.shared_empty((N,), torch.float32)
        x.fill_(3.0)
        where = x.untyped_storage().data_ptr()
        made = _shm.stats()["pool_made"], _shm.stats()["pool_hits"]
        assert await t.keep_also(x) == 1
        assert x.untyped_storage().data_ptr() == where  # not moved: born where it travels from
        assert (_shm.stats()["pool_made"], _shm.stats()["pool_hits"]) == made  # no segment taken to send it
        back, there = await t.born(N, 5)
        assert (float(back.min()), float(back.max())) == (5, 5)
        stats = await t.shm_stats()
        assert stats["pool_made"] == 1 and stats["pool_hits"] == 0  # its one segment, no copy into another
        assert _shm.find(back.untyped_storage().data_ptr()) is not None


async def test_shared_empty_arrays_travel_with_no_copy(manager):
    n = await load(manager, "np", dependencies=["numpy>=2"])
    async with asyncio.timeout(120):
        a = pyisolate.shared_empty_array((512, 1024), numpy.float32)
        a[...] = 2.0
        made = _shm.stats()["pool_made"]
        back = await n.echo(a)
        assert numpy.shares_memory(back, a)  # the same memory, back: nothing was copied
        assert _shm.stats()["pool_made"] == made


async def test_where_a_worker_cannot_reserve_segments_fresh_tensors_arrive_as_copies(manager, caplog):
    caplog.set_level(logging.WARNING, logger="pyisolate.extension.tensors")
    t = await load(manager, "tensors")
    async with asyncio.timeout(120):
        await t.limit_file_size(MIB)  # RLIMIT_FSIZE: no memfd past 1 MiB can be sized
        for i in range(3):
            got = await t.make_filled(N, i)
            assert (float(got.min()), float(got.max())) == (i, i)
            assert _shm.find(got.untyped_storage().data_ptr()) is None  # a copy, in our own memory
        stats = await t.shm_stats()
    assert stats["pool_bytes"] == 0 and stats["pool_outside"] == 3
    assert len([r for r in caplog.records if "travels as a copy" in r.getMessage()]) == 1


@pytest.mark.skipif(not (mechanisms()["memory"] or "").startswith("cgroup"), reason="no memory cgroup here")
async def test_a_worker_in_a_memory_cgroup_pools_at_most_a_quarter_of_its_limit(venv_root: Path):
    config = ExtensionManagerConfig(venv_root_path=venv_root, shm_pool_bytes=1 << 30)
    async with ExtensionManager(ExtensionBase, config) as manager:
        t = await load(manager, "tensors", limits={"memory": 512 * MIB})
        async with asyncio.timeout(120):
            assert (await t.shm_stats())["pool_limit"] == 128 * MIB  # not the 1 GiB asked for
            for i in range(3):
                got = await t.make_filled(8 * N, i)  # 32 MiB
                assert (float(got.min()), float(got.max())) == (i, i)
                del got
                await t.pinned()
            stats = await t.shm_stats()
    assert 0 < stats["pool_bytes"] <= 128 * MIB


def test_pool_sizes_are_parsed_and_bad_ones_named():
    assert _shm.parse_size("512M") == 512 * MIB and _shm.parse_size("2GiB") == 2 << 30
    assert _shm.parse_size("4096") == 4096
    with pytest.raises(ValueError, match="512M"):
        _shm.parse_size("lots")
    with pytest.raises(pyisolate.ConfigError, match="shm_pool_bytes"):
        ExtensionManagerConfig(venv_root_path="/tmp", shm_pool_bytes=-1)
