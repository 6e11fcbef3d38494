"""The host refuses, or makes room for, a worker before it could run out of file descriptors."""

from __future__ import annotations

import resource

import pytest

from pyisolate import ExtensionLoadError
from pyisolate._host import process as _process


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """100 descriptors in use; setrlimit calls are recorded, not made."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(_process, "_fds_in_use", lambda: 100)
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: calls.append(value))
    return calls


def test_room_enough_changes_nothing(limits: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    _process.ensure_fd_headroom("ext", connecting=10)
    assert limits == []


def test_low_soft_limit_is_raised_up_to_the_hard_limit(
    limits: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (120, 4096))
    _process.ensure_fd_headroom("ext", connecting=5)
    assert limits == [(240, 4096)]  # doubled
    monkeypatch.setattr(resource, "getrlimit", lambda _: (120, 150))
    _process.ensure_fd_headroom("ext", connecting=5)
    assert limits[-1] == (150, 150)  # no further than the hard limit


def test_no_room_under_the_hard_limit_is_a_clear_load_error(
    limits: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (128, 128))
    with pytest.raises(ExtensionLoadError, match=r"cannot start extension 'ext'.*limit is 128.*ulimit -n") as info:
        _process.ensure_fd_headroom("ext", connecting=1)
    assert info.value.extension == "ext"
    assert limits == []
