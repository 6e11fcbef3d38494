"""ProxiedSingleton: one real instance in the host, a proxy to it in every extension."""

from __future__ import annotations

from typing import Any

from ._rpc import ActorProxy, worker_endpoint

__all__ = ["ProxiedSingleton", "actor_name"]


def actor_name(cls: type) -> str:
    """The actor name of a singleton class: its qualified name, e.g. ``DatabaseAPI``."""
    return cls.__qualname__


class _SingletonMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        endpoint = worker_endpoint()
        if endpoint is not None:  # inside an extension: talk to the host's instance
            proxy = cls.__dict__.get("_pyisolate_proxy")
            if proxy is None or proxy._pyisolate_call.__self__ is not endpoint:
                proxy = ActorProxy(actor_name(cls).encode(), endpoint.remote_call)
                type.__setattr__(cls, "_pyisolate_proxy", proxy)
            return proxy
        instance = cls.__dict__.get("_pyisolate_instance")
        if instance is None:
            instance = super().__call__(*args, **kwargs)
            type.__setattr__(cls, "_pyisolate_instance", instance)
        return instance


class ProxiedSingleton(metaclass=_SingletonMeta):
    """A service of the host application that every extension can call.

    Subclass it in a module of the host application and list the class in
    ``ExtensionConfig(apis=[...])``. In the host, ``Cls()`` is the one real instance. In an
    extension, ``Cls()`` is a proxy: ``await Cls().method(...)`` runs the method in the host,
    whether it is a plain or a coroutine method (plain ones run in a thread pool, so a slow
    one does not stall other actors). The class's module is made importable in the extension
    from its source file, without exposing the host's site-packages.
    """
