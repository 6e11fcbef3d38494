"""Segments are sealed memfds, and received handles are checked before anything is mapped."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal

import pytest

from pyisolate._wire import shm as _shm
from pyisolate._wire.shm import _memfd, _segments


class Table:
    """Descriptors by segment id, kept as the host's hub keeps them: a real Source, real memfds."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.fetched: list[str] = []

    def fetch(self, segment_id: str) -> int:
        self.fetched.append(segment_id)
        if segment_id not in self.fds:
            raise _shm.RefusedHandle(f"no segment {segment_id!r}")
        return os.dup(self.fds[segment_id])

    def put(self, segment_id: str, fd: int) -> None:
        self.fds[segment_id] = os.dup(fd)

    def drop(self, segment_id: str) -> None:
        os.close(self.fds.pop(segment_id))

    def add(self, segment_id: str, fd: int) -> None:
        self.fds[segment_id] = fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture
def table():
    """This process plays worker "a", whose segments reach a Table."""
    state = _segments.state
    saved = (state.session, state.actor, state.source, state.shares_by_put)
    table = Table()
    _shm.configure("test", "a", source=table)
    yield table
    state.session, state.actor, state.source, state.shares_by_put = saved
    table.close()


def token() -> str:
    return os.urandom(16).hex()


def test_a_segment_is_a_sealed_reserved_memfd_that_no_holder_can_shrink(table):
    segment = _shm.create(8192)
    fd = segment.mapping.fd
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _memfd.SEALS == _memfd.SEALS
    assert os.fstat(fd).st_blocks * 512 >= 8192  # reserved: no page can fail to appear later
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        for target in (fd, reopened):
            for size in (0, 4096, 1 << 20):
                with pytest.raises(PermissionError):
                    os.ftruncate(target, size)
            with pytest.raises(PermissionError):  # and the seals themselves are sealed
                fcntl.fcntl(target, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        os.close(reopened)
    segment.mm[:5] = b"hello"
    assert segment.mm[:5] == b"hello" and os.fstat(fd).st_size == 8192


def _unsealed() -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    os.posix_fallocate(fd, 0, 4096)
    return fd


def _sealed(seals: int, reserve: bool = True) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    if reserve:
        os.posix_fallocate(fd, 0, 4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _regular(tmp_path) -> int:
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4096)
    return fd


def _pipe() -> int:
    read, write = os.pipe()
    os.close(write)
    return read


def _no_sealing() -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)  # sealing not allowed: F_GET_SEALS says SEAL only
    os.ftruncate(fd, 4096)
    os.posix_fallocate(fd, 0, 4096)
    return fd


@pytest.mark.parametrize(
    ("make", "needed", "why"),
    [
        (_regular, 10, "not a memfd"),  # e.g. a file in /dev/shm, which its owner can truncate
        (lambda _: _pipe(), 0, "not a memfd"),
        (lambda _: _unsealed(), 10, "not sealed"),
        (lambda _: _no_sealing(), 10, "not sealed"),
        (lambda _: _sealed(fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL), 10, "not sealed"),  # may grow
        (lambda _: _sealed(_memfd.SEALS, reserve=False), 10, "not reserved"),  # sparse
        (lambda _: _sealed(_memfd.SEALS), 4097, "holds 4096 bytes"),
    ],
    ids=["regular file", "pipe", "unsealed", "sealing not allowed", "no grow seal", "sparse", "too small"],
)
def test_descriptors_that_are_not_sealed_reserved_memfds_are_refused(tmp_path, make, needed, why):
    fd = make(tmp_path)
    try:
        with pytest.raises(_shm.RefusedHandle, match=why):
            _memfd.check(fd, needed)
    finally:
        os.close(fd)


def test_a_hugetlb_memfd_is_refused():
    try:
        fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"no hugetlb memfds here: {exc.strerror}")
    try:  # its pages come from a pool that can run dry: a fault there is SIGBUS
        with pytest.raises(_shm.RefusedHandle, match="not a memfd"):
            _memfd.check(fd, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("shape", "strides", "itemsize", "expected"),
    [
        ([3, 4], [4, 1], 1, 12),
        ([4, 3], [1, 4], 1, 12),  # transposed: still one place per element
        ([3, 3], [12, 2], 1, 29),  # a strided view
        ([5], [8], 8, 40),  # numpy: strides in bytes
        ([2, 1, 3], [3, 99, 1], 1, 6),  # a dimension of size 1 takes no room
        ([0, 5], [0, 0], 4, 0),
        ([], [], 4, 4),
        ([1 << 31, 1 << 31], [0, 0], 1, None),  # expand(): 4 bytes become 2**62 elements
        ([4], [0], 8, None),
        ([2, 2], [1, 1], 1, None),  # overlapping dimensions
        ([3], [-1], 1, None),
        ([3], [4], 8, None),  # numpy: elements overlap
        ([3], [1], 0, None),  # elements of no size
    ],
)
def test_layouts_whose_elements_share_memory_have_no_extent(shape, strides, itemsize, expected):
    assert _shm.extent(shape, strides, itemsize) == expected


@pytest.mark.parametrize(
    ("segment_id", "sender", "in_host", "why"),
    [
        ("b:{t}", "c", False, "not shared by 'c'"),  # another actor's segment
        ("host:{t}", "c", False, "not shared by 'c'"),  # the host's, from a worker
        ("b:{t}x", "b", False, "malformed"),
        ("../../etc/passwd", "b", False, "malformed"),
        ("b:{T}", "b", False, "malformed"),
        (42, "b", False, "malformed"),
    ],
)
def test_bad_handles_are_refused_before_anything_is_fetched(table, segment_id, sender, in_host, why):
    if isinstance(segment_id, str):
        segment_id = segment_id.format(t=token(), T=token().upper())
    with pytest.raises(_shm.RefusedHandle, match=why):
        _shm.receive(segment_id, sender, 10, in_host)
    assert table.fetched == []


def test_a_received_segment_is_checked_mapped_once_and_reused(table):
    fd = _memfd.create(4096)
    os.pwrite(fd, b"hello", 0)
    table.add(segment_id := f"b:{token()}", fd)
    mapped, held = _shm.mapped(), _memfd.held()
    with pytest.raises(_shm.RefusedHandle, match="holds 4096 bytes"):
        _shm.receive(segment_id, "b", 5000)  # reaches past the end: refused, nothing mapped
    assert (_shm.mapped(), _memfd.held()) == (mapped, held)
    segment = _shm.receive(segment_id, "b", 4096)
    assert segment.mm[:5] == b"hello" and _shm.mapped() == mapped + 1
    again = _shm.receive(segment_id, "b", 4096)
    assert again.mm is segment.mm and table.fetched == [segment_id] * 2  # no second fetch
    host = f"host:{token()}"
    table.add(host, _memfd.create(4096))
    assert _shm.receive(host, "SomeSingleton", 10, sender_in_host=True).size == 4096


def test_a_segment_shared_again_gets_an_id_of_its_own(table):
    fd = _memfd.create(4096)
    table.add(received := f"b:{token()}", fd)
    segment = _shm.receive(received, "b", 4096)
    ours = _shm.share(b"c", segment)  # passed on to c: under our id, PUT once
    assert ours.startswith("a:") and ours in table.fds and _shm.share(b"d", segment) == ours
    assert len(table.fds) == 2
    _shm.unpin(b"c", [_shm.ack_key(ours)])
    _shm.unpin(b"d", [_shm.ack_key(ours)])
    assert _shm.pinned() == 0


def test_a_mapping_takes_its_descriptor_with_it_and_drops_what_it_put(table):
    held = _memfd.held()
    segment = _shm.create(4096)
    segment_id = _shm.share(b"b", segment)
    fd = segment.mapping.fd
    assert _memfd.held() == held + 1 and segment_id in table.fds
    _shm.drop_peer(b"b")
    del segment
    assert _memfd.held() == held and segment_id not in table.fds  # DROPped
    with pytest.raises(OSError):
        os.fstat(fd)


def test_no_room_for_a_segment_is_typed_and_names_the_fix(table):
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(_shm.NoRoom) as info:
            _shm.create(4 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert info.value.errno == errno.EFBIG and "ulimit -f" in info.value.fix
    assert info.value.size == 4 << 20


def test_a_segment_received_under_many_ids_is_remembered_by_a_few(table):
    fd = _memfd.create(4096)
    ids = [f"b:{token()}" for _ in range(50)]  # e.g. our tensor coming back, each time a new id
    for segment_id in ids:
        table.add(segment_id, os.dup(fd))
    os.close(fd)
    segments = [_shm.receive(segment_id, "b", 4096) for segment_id in ids]
    assert all(s.mm is segments[0].mm for s in segments) and _shm.mapped() == 1
    mapping = segments[0].mapping
    assert len(mapping.ids) <= 9 and sum(m is mapping for m in _segments._by_id.values()) <= 9
    assert _shm.receive(ids[0], "b", 4096).mm is segments[0].mm  # forgotten, found again by inode
