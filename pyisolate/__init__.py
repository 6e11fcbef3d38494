"""pyisolate: run extensions in their own venvs and processes, and call them as if local.

Importing this package opens no socket and starts no thread. The host-side machinery
(manager, broker, venv builder) is imported on first use, so that worker processes,
which import ``pyisolate`` for ``ExtensionBase``, start with the least code possible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import ExtensionBase
from .errors import (
    CallTimeoutError,
    ConfigError,
    DiscoveryError,
    EncodeError,
    EnvironmentBuildError,
    ExtensionClosedError,
    ExtensionCrashedError,
    ExtensionLoadError,
    ExtensionReloadedError,
    LoadExtensionsError,
    MessageTooLargeError,
    PlacementError,
    ProtocolError,
    PyisolateError,
    QueueFullError,
    RemoteError,
    UnroutableError,
)

if TYPE_CHECKING:
    from ._actors import emit, get_actor
    from ._config import ExtensionConfig, ExtensionManagerConfig, RestartPolicy
    from ._curve import CurveConfig
    from ._discovery import discover
    from ._envs import ProgressDisplay, ProgressEvent, ProgressStep
    from ._limits import Limits
    from ._placement import RayPlacement
    from ._policy import SandboxMode, SandboxPolicy
    from ._host import Extension, ExtensionManager, SyncExtensionManager, method, remote_worker_command, stats
    from ._rpc import sync
    from ._wire import TypeRegistry, handle, shared_empty, shared_empty_array
    from ._singleton import ProxiedSingleton

__all__ = [
    "CallTimeoutError",
    "ConfigError",
    "CurveConfig",
    "DiscoveryError",
    "EncodeError",
    "EnvironmentBuildError",
    "Extension",
    "ExtensionBase",
    "ExtensionClosedError",
    "ExtensionConfig",
    "ExtensionCrashedError",
    "ExtensionLoadError",
    "ExtensionManager",
    "ExtensionManagerConfig",
    "ExtensionReloadedError",
    "Limits",
    "LoadExtensionsError",
    "MessageTooLargeError",
    "PlacementError",
    "ProgressDisplay",
    "ProgressEvent",
    "ProgressStep",
    "ProtocolError",
    "ProxiedSingleton",
    "PyisolateError",
    "QueueFullError",
    "RayPlacement",
    "RemoteError",
    "RestartPolicy",
    "SandboxMode",
    "SandboxPolicy",
    "SyncExtensionManager",
    "TypeRegistry",
    "UnroutableError",
    "discover",
    "emit",
    "get_actor",
    "handle",
    "method",
    "remote_worker_command",
    "shared_empty",
    "shared_empty_array",
    "stats",
    "sync",
]

__version__ = "0.1.0"

# No handler of our own, not even a NullHandler: an application that configures no logging
# still sees warnings and errors (worker stderr included) through logging's last resort.

_LAZY = {
    "ExtensionConfig": "._config",
    "ExtensionManagerConfig": "._config",
    "RestartPolicy": "._config",
    "CurveConfig": "._curve",
    "remote_worker_command": "._host",
    "Limits": "._limits",
    "RayPlacement": "._placement",
    "SandboxMode": "._policy",
    "SandboxPolicy": "._policy",
    "Extension": "._host",
    "ExtensionManager": "._host",
    "ProgressDisplay": "._envs",
    "ProgressEvent": "._envs",
    "ProgressStep": "._envs",
    "ProxiedSingleton": "._singleton",
    "SyncExtensionManager": "._host",
    "discover": "._discovery",
    "emit": "._actors",
    "get_actor": "._actors",
    "method": "._host",
    "sync": "._rpc",
    "TypeRegistry": "._wire",
    "handle": "._wire",
    "shared_empty": "._wire",
    "shared_empty_array": "._wire",
    "stats": "._host",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyisolate' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
