"""What extension code calls to reach other actors: get_actor() and emit()."""

from __future__ import annotations

from pyisolate.broker.protocol import HOST

from ._rpc import ActorProxy, worker_endpoint

__all__ = ["emit", "get_actor"]


def _endpoint(what: str):  # type: ignore[no-untyped-def]
    endpoint = worker_endpoint()
    if endpoint is None:
        raise RuntimeError(
            f"pyisolate.{what}() works inside an extension process; in the host use "
            f"manager.get_actor() and manager.on_event()"
        )
    return endpoint


def get_actor(name: str) -> ActorProxy:
    """A handle to the actor ``name`` (another extension, or a singleton of the host).

    Its public methods return awaitables. A name no actor has fails at the first call with
    ``UnroutableError`` naming it.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"get_actor() takes an actor name, got {name!r}")
    return ActorProxy(name.encode(), _endpoint("get_actor").remote_call)


def emit(name: str, value: object = None) -> None:
    """Send event ``name`` with ``value`` to the host's handlers; returns at once.

    Callable from coroutines and from threads; events of one extension reach the host in order.
    """
    if not isinstance(name, str):
        raise TypeError(f"event names are strings, got {name!r}")
    _endpoint("emit").emit(HOST, name, value)
