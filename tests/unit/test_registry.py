"""Who may join as which name: the broker's registry (pure logic)."""

from __future__ import annotations

from pyisolate.broker.registry import Registry


def test_a_local_name_joins_with_its_secret_only() -> None:
    registry = Registry()
    registry.expect(b"ext", b"s" * 32)
    assert not registry.admit(b"rid1", b"ext", b"x" * 32).ok
    assert registry.admit(b"rid1", b"ext", b"s" * 32).ok
    assert registry.name_of(b"rid1") == b"ext"
    assert "is taken" in registry.admit(b"rid2", b"ext", b"s" * 32).reason


def test_a_remote_name_joins_only_through_the_listener_and_a_local_one_only_through_ipc() -> None:
    registry = Registry()
    registry.expect(b"far", b"", remote=True)
    registry.expect(b"near", b"s" * 32)
    refused = registry.admit(b"ipc", b"far", b"")  # an ipc connection, even with the (empty) secret
    assert not refused.ok and "only as a remote worker" in refused.reason
    refused = registry.admit(b"tcp", b"near", b"s" * 32, remote=True)
    assert not refused.ok and "only as a local worker" in refused.reason
    assert registry.admit(b"tcp", b"far", b"", remote=True).ok  # its key was checked by the broker


def test_a_forgotten_remote_name_can_be_expected_again_for_a_rejoin() -> None:
    registry = Registry()
    registry.expect(b"far", b"", remote=True)
    assert registry.admit(b"tcp1", b"far", b"", remote=True).ok
    registry.forget(b"far")
    assert "is starting" in registry.admit(b"tcp2", b"far", b"", remote=True).reason
    registry.expect(b"far", b"", remote=True)
    assert registry.admit(b"tcp2", b"far", b"", remote=True).ok
    assert registry.name_of(b"tcp1") is None
