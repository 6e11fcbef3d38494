"""Shared-memory handles are checked before anything is mapped."""

from __future__ import annotations

import os

import pytest

from pyisolate import _shm


@pytest.fixture
def session():
    saved = (_shm._session, _shm._actor)
    _shm.configure(f"{os.getpid()}xabcdef01", "a")
    yield
    _shm.sweep()
    _shm.configure(*saved)


def test_a_segment_is_accepted_from_its_owner_and_its_mapping_reused(session):
    segment = _shm.create(4096)
    segment.mm[:5] = b"hello"
    received = _shm.receive(segment.name, "a", 4096)
    assert received.mm is segment.mm  # already mapped here: no second mapping
    assert received.mm[:5] == b"hello"


@pytest.mark.parametrize(
    ("sender", "needed", "name", "why"),
    [
        ("c", 10, None, "not shared by 'c'"),  # another actor's segment
        ("a", 5000, None, "holds 4096 bytes"),  # reaches past the end
        ("a", 10, "psi-1x00000000-a-1", "another session"),
        ("a", 10, "../../etc/passwd", "malformed"),
        ("a", 10, "psi-{s}-a-999999", "cannot be opened"),
    ],
)
def test_bad_handles_are_refused_before_mapping(session, sender, needed, name, why):
    segment = _shm.create(4096)
    name = segment.name if name is None else name.format(s=_shm._session)
    with pytest.raises(_shm.RefusedHandle, match=why):
        _shm.receive(name, sender, needed)


def test_names_leave_with_their_mapping(session):
    segment = _shm.create(4096)
    name = segment.name
    del segment
    assert not os.path.exists(f"/dev/shm/{name}")
