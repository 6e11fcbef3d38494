"""No peer can make the host fault through shared memory, and values arrive where it has no room.

Scenarios that killed the host before (SIGBUS) run in a host process of their own
(``tests/shm_host.py``), so that a regression fails the test instead of killing pytest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from pyisolate import ExtensionConfig, ProtocolError
from pyisolate._wire import shm as _shm
from pyisolate._host.worker import describe_exit

torch = pytest.importorskip("torch")

from tests.support import ext  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOST = ROOT / "tests" / "shm_host.py"
MAX = _shm.MAX_SEGMENTS_PER_WORKER


def run_host(scenario: str, venv_root: Path, prefix: list[str] | None = None) -> dict[str, object]:
    """Run a scenario in a host process of its own; its findings, or the way it died."""
    proc = subprocess.run([*(prefix or []), sys.executable, str(HOST), scenario, str(venv_root)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"the host {describe_exit(proc.returncode)}:\n{proc.stderr[-3000:]}"
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


async def load(manager, name, path="hostile_shm", **kw):
    async with asyncio.timeout(180):
        return await manager.load_extension(ExtensionConfig(name=name, module_path=ext(path), share_torch=True, **kw))


# -- C8: a peer shrinking a segment -------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["truncate_theirs", "truncate_ours"])
def test_an_extension_shrinking_segments_cannot_make_the_host_fault(venv_root, scenario):
    # theirs: the extension sends a tensor, then tries to shrink it (and every other segment it
    # can name: its own descriptors, /proc/self/fd, /proc/<host>/fd, map_files); the host sums it.
    # ours: the host sends a tensor, the extension tries the same, the host writes and sums it.
    found = run_host(scenario, venv_root)
    assert found["targets"] >= 2 and found["attempts"] > found["targets"]  # the attack was real
    assert found["shrunk"] == []
    assert found["sum_ok"] is True


# -- C7: small /dev/shm, and no room at all ------------------------------------------------------

def _private_dev_shm() -> list[str]:
    """A command prefix that runs the host with a 64 MiB tmpfs on /dev/shm, or skip saying why."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small /dev/shm needs root (unshare --mount)")
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    mount = "mount -t tmpfs -o size=64m tmpfs /dev/shm"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here: {probe.stderr.strip()}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount} && exec "$0" "$@"']


def test_a_small_dev_shm_does_not_limit_tensors(venv_root):
    found = run_host("small_dev_shm", venv_root, _private_dev_shm())
    assert found["dev_shm_bytes"] == 64 << 20  # Docker's default size
    assert found["dev_shm_free_after_fill"] <= 4 << 20  # the plugin holds 60 MiB of it
    assert found["big_ok"] and found["big_shared"]  # 100 MiB there and back, shared, not copied
    assert found["mid_ok"] and found["mid_shared"] and found["made_ok"]  # 16 MiB each way
    assert found["copies"] == []


def test_where_the_host_cannot_reserve_segments_values_arrive_as_copies_with_one_warning(venv_root):
    found = run_host("host_fallback", venv_root)  # RLIMIT_FSIZE: posix_fallocate fails, EFBIG
    assert found["tensor_ok"] and found["tensor_again_ok"] and found["tensor_private"]
    assert found["array_ok"] and found["array_again_ok"]
    copies = found["copies"]
    assert isinstance(copies, list) and len(copies) == 1, copies
    assert "ulimit -f" in copies[0] and "tensor of 4194304 bytes" in copies[0]


async def test_where_a_worker_cannot_reserve_segments_its_values_arrive_as_copies_with_one_warning(
        manager, caplog):
    caplog.set_level(logging.WARNING, logger="pyisolate.extension.np")
    arrays = await load(manager, "np", "tensors", dependencies=["numpy>=2"])
    async with asyncio.timeout(60):
        await arrays.limit_file_size(1 << 20)
        for _ in range(2):
            made = await arrays.make(1 << 20)  # 4 MiB: no segment for it in the worker
            assert made.tolist() == [float(i) for i in range(1 << 20)]
            assert _shm.find(made.untyped_storage().data_ptr()) is None  # a private copy here
            assert numpy.array_equal(await arrays.array(1 << 19), numpy.arange(1 << 19, dtype=numpy.float64))
        assert (await arrays.shm_stats())["mapped"] == 0
    copies = [r for r in caplog.records if "travels as a copy" in r.getMessage()]
    assert len(copies) == 1 and copies[0].name.startswith("pyisolate.extension.np.")
    assert "ulimit -f" in copies[0].getMessage()


# -- C9: layouts that turn a few bytes into an enormous tensor or array --------------------------

@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("expand", "zero or overlapping strides"),
        ("overlap", "zero or overlapping strides"),
        ("numpy zero stride", "zero or overlapping strides"),
        ("numpy overlap", "zero or overlapping strides"),
        ("too big", "holds 4096 bytes"),
    ],
)
async def test_handles_whose_layout_lies_are_refused_before_anything_is_mapped(manager, kind, why):
    hostile = await load(manager, "hostile")
    before = _shm.stats()
    with pytest.raises(ProtocolError, match=why):
        async with asyncio.timeout(30):
            await hostile.crafted(kind)  # a real 4 KiB segment of the extension's, PUT to the host
    after = _shm.stats()
    assert (after["mapped"], after["fds_held"] - after["worker_fds"]) == (
        before["mapped"], before["fds_held"] - before["worker_fds"])  # nothing mapped, nothing opened


async def test_expanded_tensors_and_broadcast_arrays_travel_dense_with_their_values(manager):
    t = await load(manager, "tensors", "tensors")
    n = await load(manager, "np", "tensors", dependencies=["numpy>=2"])
    async with asyncio.timeout(60):
        wide = torch.arange(4.0).expand(1000, 4)  # 16 bytes of storage, 4000 elements
        assert await t.describe(wide) == ["torch.float32", [1000, 4], [4, 1], 0, False]
        assert await t.values(wide) == wide.tolist()
        back = await t.expanded(3)
        assert back.tolist() == [[0.0, 1.0, 2.0, 3.0]] * 3 and back.stride() == (4, 1)
        shared = await n.echo(numpy.arange(1 << 17, dtype=numpy.float64))  # 1 MiB, in a segment
        broadcast = numpy.broadcast_to(shared, (4, 1 << 17))  # a zero stride over shared memory
        echoed = await n.echo(broadcast)
        assert numpy.array_equal(echoed, broadcast) and echoed.strides == (8 << 17, 8)


# -- descriptors passed by workers ---------------------------------------------------------------

async def test_descriptors_a_worker_passes_are_checked_and_bounded(manager):
    hostile = await load(manager, "hostile")
    fds = len(os.listdir("/proc/self/fd"))
    async with asyncio.timeout(120):
        assert await hostile.put_junk() == 13
        stats = _shm.stats()
        assert stats["worker_fds"] == 1  # of thirteen, one PUT was a sealed memfd under a new id of its own
        assert stats["refused"] == {
            "PUT of a descriptor that is not a sealed memfd": 5,  # file, pipe ends, unsealed, sparse
            "PUT of another actor's id": 2,
            "PUT of a known id": 1,
            "cut message": 1,  # too long
            "unexpected message": 2,  # two descriptors; an unknown kind
            "short GET": 1,
        }
        assert "no segment" in await hostile.get_unknown()
        await hostile.flood_puts(MAX + 100)
        stats = _shm.stats()
        assert stats["worker_fds"] == MAX
        assert stats["refused"]["PUT beyond the bound"] == 101
        assert len(os.listdir("/proc/self/fd")) <= fds + MAX + 8
        await hostile.stop()
    assert _shm.stats()["worker_fds"] == 0
    assert len(os.listdir("/proc/self/fd")) < fds


async def test_a_worker_sharing_more_segments_than_the_bound_sends_the_rest_as_copies(manager, caplog):
    caplog.set_level(logging.WARNING, logger="pyisolate.extension.hostile")
    hostile = await load(manager, "hostile")
    async with asyncio.timeout(120):
        many = await hostile.make_many(MAX + 10)
    assert [t.tolist() for t in many] == [[float(i)] * 4 for i in range(MAX + 10)]
    assert _shm.stats()["worker_fds"] == MAX
    assert len([r for r in caplog.records if "travels as a copy" in r.getMessage()]) == 1
