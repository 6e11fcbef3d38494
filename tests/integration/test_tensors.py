"""Tensors and large arrays as shared-memory handles, through real workers with share_torch."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import numpy
import pytest

from pyisolate import (
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionManager,
    ExtensionManagerConfig,
)
from pyisolate._wire import shm as _shm

torch = pytest.importorskip("torch")

from shared_api import DatabaseAPI  # noqa: E402

from tests.support import ext  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def host_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def manager(venv_root: Path):
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as m:
        yield m
    assert _shm.stats()["worker_fds"] == 0, "the host holds descriptors of stopped workers"
    # Segments live in no file system (other test runs on this machine may use /dev/shm).
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"psi-{os.getpid()}x")]


async def load(manager, name="tensors", **kw):
    async with asyncio.timeout(180):
        return await manager.load_extension(
            ExtensionConfig(name=name, module_path=ext("tensors"), share_torch=True, **kw)
        )


async def test_child_imports_the_hosts_own_torch(manager):
    t = await load(manager)
    assert os.path.realpath(await t.torch_file()) == os.path.realpath(torch.__file__)
    # An extension that asks for torch gets the shared one: uv installs no torch of its own.
    asks = await load(manager, "asks-torch", dependencies=["torch>=2", "six"])
    assert os.path.realpath(await asks.torch_file()) == os.path.realpath(torch.__file__)


async def test_a_share_torch_worker_has_torch_imported_before_it_is_ready(manager):
    """Not on its serving loop when the first tensor arrives, which held calls and heartbeats
    back for the seconds the import takes (under load, past the heartbeat timeout)."""
    async with asyncio.timeout(180):
        shared = await manager.load_extension(ExtensionConfig(name="ok-torch", module_path=ext("ok"), share_torch=True))
        plain = await manager.load_extension(ExtensionConfig(name="ok-plain", module_path=ext("ok")))
    assert await shared.imported("torch") is True
    assert await plain.imported("torch") is False


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
async def test_every_dtype_round_trips(manager, dtype):
    t = await load(manager)
    source = (torch.arange(12) % 2 if dtype is torch.bool else torch.arange(12)).to(dtype).reshape(3, 4)
    back = await t.echo(source)
    assert back.dtype == dtype and torch.equal(back, source)


async def test_views_keep_stride_offset_and_in_place_writes_are_shared(manager):
    t = await load(manager)
    base = torch.zeros(4, 6)
    view = base[1:, ::2]  # offset 6, stride (6, 2)
    assert await t.describe(view) == ["torch.float32", [3, 3], [6, 2], 6, False]
    await t.fill(view, 5.0)  # the extension writes; the host sees it, through the tensor it sent
    assert view.eq(5).all()
    await t.keep(base)
    base.add_(1)  # the host writes; the extension sees it
    assert (await t.kept_values())[0] == [1.0] * 6
    await t.drop()


async def test_tensors_from_the_extension_and_requires_grad(manager):
    t = await load(manager)
    made = await t.make(5)
    assert made.tolist() == [0, 1, 2, 3, 4]
    made.mul_(2)
    assert await t.values(made) == [0, 2, 4, 6, 8]
    leaf = torch.ones(3, requires_grad=True)
    assert (await t.describe(leaf))[-1] is True
    grad = await t.grad_of_square(torch.tensor([1.0, 2.0, 3.0]))
    assert grad.tolist() == [2.0, 4.0, 6.0]  # autograd runs in the child


async def test_extension_to_extension_and_to_a_singleton(manager):
    a = await load(manager, "ta", apis=[DatabaseAPI])
    await load(manager, "tb")
    shared = await a.make(4)
    assert await a.pass_to("tb", shared) == ["torch.float32", [4], [1], 0, False]
    DatabaseAPI().set("t", None)
    x = torch.full((2, 2), 3.0)
    await a.echo(x)


async def test_passing_a_shared_tensor_again_is_metadata_only(manager):
    t = await load(manager)
    x = torch.randn(256, 256)
    await t.echo(x)  # moved into shared memory once
    segment = _shm.find(x.untyped_storage().data_ptr())
    assert segment is not None
    before = (_shm.mapped(), _shm.stats()["worker_fds"], host_fds())
    for _ in range(20):
        back = await t.echo(x)
        assert back.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # our mapping, reused
    assert (_shm.mapped(), _shm.stats()["worker_fds"], host_fds()) == before


async def test_a_calls_answer_releases_the_tensors_it_received(manager):
    t = await load(manager)
    x = torch.ones(1024)
    for _ in range(50):  # the method let go of them: no ACK message of its own, the RESULT header carries it
        assert await t.describe(x) == ["torch.float32", [1024], [1], 0, False]
        assert _shm.pinned() == 0
    with pytest.raises(TypeError):
        await t.fill(x, "not a number")  # raises in the extension: the ERROR acknowledges too
    assert _shm.pinned() == 0
    many = [torch.full((4,), float(i)) for i in range(150)]  # more names than one header carries
    assert await t.nbytes(many) == 150  # overflow acknowledged by ACK messages sent before the answer
    assert _shm.pinned() == 0
    del many, x  # their segments go now, not whenever this test's frame is collected
    gc.collect()


async def test_tensors_in_an_answer_are_released_when_the_last_view_dies_by_the_next_call_or_at_the_end_of_the_turn(
        manager):
    t = await load(manager)
    endpoint = manager.endpoint
    for _ in range(20):
        made = await t.make(4)
        view = made[1:]
        del made
        assert await t.pinned() == 1  # mapped here is not enough: a view of it lives, the worker keeps it
        assert view.tolist() == [1.0, 2.0, 3.0]
        del view
        assert endpoint.acks.owed  # released, not sent yet: the next call will carry it
        assert await t.pinned() == 0  # ...and it did, before the method ran
    made = await t.make(4)
    await asyncio.sleep(0)  # (the loop's handle that resumed this task with it is gone now)
    del made
    await asyncio.sleep(0)  # two turns of the loop, no call to carry them:
    await asyncio.sleep(0)  # the end of the turn sends an ACK message instead
    assert endpoint.acks.owed == {}
    assert await t.pinned() == 0


async def test_ten_thousand_sends_leave_nothing_behind(manager):
    t = await load(manager)
    baseline = (_shm.mapped(), _shm.stats()["fds_held"], host_fds())
    worker_baseline = (await t.shm_stats())["fds"]
    for i in range(10_000):
        await t.echo(torch.full((8,), float(i)))
    gc.collect()
    await t.echo(None)  # the worker's last ACKs and its finalizers have run
    assert _shm.pinned() == 0
    assert _shm.stats()["worker_fds"] == 0  # the worker DROPped every segment it PUT
    assert (_shm.mapped(), _shm.stats()["fds_held"], host_fds()) == baseline
    worker = await t.shm_stats()
    assert (worker["mapped"], worker["pinned"], worker["fds_held"], worker["fds"]) == (0, 0, 0, worker_baseline)


async def test_stopping_an_extension_releases_its_segments(manager):
    t = await load(manager)
    ours = torch.arange(1000, dtype=torch.float32)
    await t.keep(ours)  # the worker maps our segment
    theirs = await t.make_and_keep(10)  # and shares one of its own: the host holds its descriptor
    assert (await t.shm_stats())["mapped"] == 2
    assert _shm.stats()["worker_fds"] == 1
    await t.stop()
    assert _shm.stats()["worker_fds"] == 0
    assert ours.sum().item() == sum(range(1000))  # our mappings are untouched
    assert theirs.tolist() == list(range(10))


async def test_large_numpy_arrays_travel_through_shared_memory(manager):
    n = await load(manager, "np", dependencies=["numpy>=2"])
    big = numpy.arange(1 << 18, dtype=numpy.float64).reshape(512, 512)[:, ::2]  # a strided view
    back = await n.echo(big)
    assert back.dtype == big.dtype and back.shape == big.shape and numpy.array_equal(back, big)
    base = back
    while base is not None and not _shm.is_lease(base):
        base = getattr(base, "base", None)
    assert base is not None, "the result does not live in a shared-memory mapping"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_tensors_travel_by_ipc_and_stay_on_the_device(manager):
    t = await load(manager)
    x = torch.arange(16, device="cuda", dtype=torch.float32)
    assert await t.describe(x) == ["torch.float32", [16], [1], 0, False]
    await t.fill(x, 2.0)
    torch.cuda.synchronize()
    assert x.eq(2).all().item()
    back = await t.echo(x)
    assert back.is_cuda and torch.equal(back, x)


async def test_cuda_tensors_do_not_travel_to_or_from_an_extension_that_does_not_share_them(manager):
    from pyisolate import ProtocolError

    async with asyncio.timeout(180):
        hostile = await manager.load_extension(ExtensionConfig(name="hostile", module_path=ext("hostile")))
        # share_cuda_ipc unset and no share_torch: the host refuses its CUDA handle before opening anything.
        with pytest.raises(ProtocolError, match="a CUDA tensor from 'hostile' is refused: extension 'hostile' does "
                                                r"not share CUDA tensors \(share_cuda_ipc is off\)"):
            await hostile.answer_cuda_tensor()
        # An extension that shares torch but not CUDA tensors refuses one itself, whoever sends it.
        await load(manager, "no-cuda", share_cuda_ipc=False)
        said = await hostile.send_cuda_tensor("no-cuda", "describe")
        assert "DecodeError: a CUDA tensor from 'hostile' is refused: this extension ('no-cuda') does not share" in said
        assert "move it to the CPU first" in said


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_a_cuda_tensor_for_an_extension_without_share_cuda_ipc_fails_where_it_is_sent(manager):
    from pyisolate import EncodeError

    t = await load(manager, "no-cuda", share_cuda_ipc=False)
    x = torch.arange(4, device="cuda", dtype=torch.float32)
    with pytest.raises(EncodeError, match=r"cannot be sent to 'no-cuda'.*share_cuda_ipc.*move it to the CPU first"):
        await t.describe(x)
    assert await t.describe(x.cpu()) == ["torch.float32", [4], [1], 0, False]


async def test_a_crashed_extension_leaves_no_segments(manager):
    from pyisolate import ExtensionCrashedError

    t = await load(manager)
    await t.make_and_keep(100)
    assert _shm.stats()["worker_fds"] == 1
    with pytest.raises(ExtensionCrashedError):
        async with asyncio.timeout(10):
            await t.crash()
    assert _shm.stats()["worker_fds"] == 0  # released before the crash was reported


async def test_an_answer_sent_just_before_its_worker_died_still_arrives(manager):
    """A worker answers with a shared tensor and dies at once: the host holds the segment's
    descriptor until it has handled the exit, so the answer, already on its way, is read
    intact rather than failing for a segment gone."""
    from tests.support import block_until_readable

    e = await load(manager)
    pidfd = os.pidfd_open(manager._extensions["tensors"].process.pid)
    try:
        async with asyncio.timeout(60):
            call = asyncio.ensure_future(e.answer_then_die(1 << 18))
            await asyncio.sleep(0)  # one turn: the call leaves; then the loop blocks
            block_until_readable(pidfd, 30)  # until the worker, having answered, is dead
            t = await call  # the answer and the worker's exit were both waiting
    finally:
        os.close(pidfd)
    assert t.shape == (1 << 18,) and float(t.sum()) == float(sum(range(1 << 18)))
    del t, call  # the host's mapping closes with the tensor (the task holds it too)
    with pytest.raises(ExtensionCrashedError):
        async with asyncio.timeout(60):
            await e.torch_file()


async def test_share_torch_workers_have_numpy_for_torch(manager, caplog):
    """A share_torch venv gets numpy (the host's version) unless the extension names its own:
    ``tensor.numpy()`` works and no worker warns "Failed to initialize NumPy"."""
    with caplog.at_level("WARNING", logger="pyisolate.extension"):
        e = await load(manager)
        async with asyncio.timeout(60):
            doubled, version = await e.through_numpy(torch.arange(4, dtype=torch.float32))
            assert doubled.tolist() == [0.0, 2.0, 4.0, 6.0]
            assert version == numpy.__version__
            own = await load(manager, "tensors-np1", dependencies=["numpy<2"])
            _, own_version = await own.through_numpy(torch.ones(2))
    assert own_version.startswith("1.")  # the extension's own numpy requirement wins
    assert not [r for r in caplog.records if "Failed to initialize NumPy" in r.getMessage()]
