"""The public exception tree of pyisolate.

The tree:

    PyisolateError
    ├── ConfigError (ValueError)            a config value is wrong; names the field and the fix
    │   └── DiscoveryError                  some discovered extensions are invalid; carries the rest
    ├── EnvironmentBuildError               uv could not build an extension's venv
    ├── ExtensionLoadError                  the extension failed to import or start
    ├── PlacementError                      a cluster engine (Ray) could not place its worker
    ├── ExtensionCrashedError               the worker process died (exit code, stderr tail)
    ├── ExtensionClosedError                you stopped it; calls after stop() land here
    │   └── ExtensionReloadedError          its worker was replaced by reload(); names the reload
    ├── CallTimeoutError (TimeoutError)     a call had no answer within its timeout
    ├── RemoteError                         a remote exception that could not be rebuilt locally
    ├── ProtocolError                       a peer broke the wire protocol (version, framing)
    ├── UnroutableError (LookupError)       no actor of that name is connected to the broker
    ├── QueueFullError                      a bounded queue is full: names which, for whom, the limit
    ├── MessageTooLargeError                a message exceeds max_message_size
    ├── EncodeError (TypeError)             a value cannot travel; names its type and place
    └── LoadExtensionsError (ExceptionGroup) load_extensions(): some failed, the rest are loaded

"You closed it" (`ExtensionClosedError`) is kept apart from "it broke"
(`ExtensionCrashedError`), so callers can tell a shutdown race from a fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "CallTimeoutError",
    "ConfigError",
    "DiscoveryError",
    "EncodeError",
    "EnvironmentBuildError",
    "ExtensionClosedError",
    "ExtensionCrashedError",
    "ExtensionLoadError",
    "ExtensionReloadedError",
    "LoadExtensionsError",
    "MessageTooLargeError",
    "PlacementError",
    "ProtocolError",
    "PyisolateError",
    "QueueFullError",
    "RemoteError",
    "UnroutableError",
]


class PyisolateError(Exception):
    """Base class of every error pyisolate raises itself."""

    #: Keyword arguments of the constructor that travel with the error to another process,
    #: so that it is rebuilt there as itself (str, int, None and lists of str only).
    _pyisolate_fields: tuple[str, ...] = ()


class ConfigError(PyisolateError, ValueError):
    """A configuration value is invalid."""


class EnvironmentBuildError(PyisolateError):
    """uv failed to create or populate an extension's virtual environment."""

    _pyisolate_fields = ("extension", "packages", "output_tail")

    def __init__(self, message: str, *, extension: str, packages: list[str], output_tail: str) -> None:
        super().__init__(message)
        self.extension = extension
        self.packages = packages
        self.output_tail = output_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.output_tail:
            text += "\n--- uv output (tail) ---\n" + self.output_tail
        return text


class ExtensionLoadError(PyisolateError):
    """The extension's module or class could not be loaded in its worker."""

    _pyisolate_fields = ("extension", "remote_traceback")

    def __init__(self, message: str, *, extension: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.extension = extension
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n--- traceback in the extension ---\n" + self.remote_traceback
        return text


class PlacementError(PyisolateError):
    """A cluster engine could not place the extension's worker (``RayPlacement``).

    The cluster could not be reached, or no node took the request within the placement's
    ``start_timeout`` (the message says what the nodes offer), or the node could not start
    the process. Once the worker has started, losing its node is an ExtensionCrashedError.
    """

    _pyisolate_fields = ("extension",)

    def __init__(self, message: str, *, extension: str) -> None:
        super().__init__(message)
        self.extension = extension


class ExtensionCrashedError(PyisolateError):
    """The extension's worker process exited while calls were pending or it was needed."""

    _pyisolate_fields = ("extension", "exit_code", "stderr_tail")

    def __init__(
        self, message: str, *, extension: str, exit_code: int | None, stderr_tail: str = ""
    ) -> None:
        super().__init__(message)
        self.extension = extension
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.stderr_tail:
            text += "\n--- stderr of the extension (tail) ---\n" + self.stderr_tail
        return text


class ExtensionClosedError(PyisolateError):
    """The extension (or its manager) was stopped; it takes no more calls."""


class ExtensionReloadedError(ExtensionClosedError):
    """The worker that owned this object, stream or call was replaced by ``reload()``.

    Raised by a proxy, callback or stream of an object the old worker gave out, once that
    worker is gone (and by a call still running on it when its drain timed out). The
    extension itself serves on: call it again through its handle. ``generation`` is the
    generation that replaced the old one (1 for the first reload).
    """

    _pyisolate_fields = ("extension", "generation")

    def __init__(self, message: str, *, extension: str, generation: int) -> None:
        super().__init__(message)
        self.extension = extension
        self.generation = generation


class CallTimeoutError(PyisolateError, TimeoutError):
    """A call got no answer within its timeout; the remote task was asked to cancel."""


class RemoteError(PyisolateError):
    """An exception raised in another process whose type is not rebuilt locally."""

    def __init__(self, message: str, *, remote_type: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.remote_type}: {super().__str__()}"


class ProtocolError(PyisolateError):
    """A peer sent something the wire protocol does not allow."""


class UnroutableError(PyisolateError, LookupError):
    """No actor of the given name is connected to the broker."""


class QueueFullError(PyisolateError):
    """A bounded queue between actors is full; the message names the queue, for whom, and the limit.

    Callers that stay within ``max_in_flight`` never see it for calls (they wait for a slot
    instead); it means a sender went past what the protocol allows, or honest traffic needs
    more than the configured memory (``ExtensionManagerConfig.max_queued_bytes``).
    """


class MessageTooLargeError(PyisolateError):
    """A message (body plus buffers) exceeds ``ExtensionManagerConfig.max_message_size``."""


class EncodeError(PyisolateError, TypeError):
    """A value cannot be sent to another process."""


class DiscoveryError(ConfigError):
    """Some extensions found by ``pyisolate.discover()`` are invalid or share a name.

    Attributes:
        configs: The ``ExtensionConfig`` of each valid extension, for a host that loads what it can.
        problems: One ConfigError per invalid extension or duplicate name.
    """

    # configs holds ExtensionConfig; typed Any because errors sit below the config module.
    def __init__(self, problems: Sequence[ConfigError], configs: Sequence[Any]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) among the extensions found:\n{lines}")
        self.problems = list(problems)
        self.configs = list(configs)


class LoadExtensionsError(ExceptionGroup[Exception], PyisolateError):
    """``load_extensions()`` loaded some extensions and not others.

    The failures are the group's ``exceptions``, so ``except* EnvironmentBuildError`` works,
    and an uncaught one prints every cause with its traceback.

    Attributes:
        loaded: Name -> Extension, the ones that are ready (still running); blocking handles
            when it comes from ``SyncExtensionManager.load_extensions()``.
        failed: Name -> the exception that stopped that one (it has been released).
    """

    loaded: dict[str, Any]  # Extension, or a blocking handle from SyncExtensionManager
    failed: dict[str, BaseException]

    def __new__(
        cls, message: str, exceptions: Sequence[Exception], *, loaded: dict[str, Any],
        failed: dict[str, BaseException],
    ) -> LoadExtensionsError:  # fmt: skip
        self = super().__new__(cls, message, exceptions)
        self.loaded = loaded
        self.failed = failed
        return self

    def __init__(self, message: str, exceptions: Sequence[Exception], **_: Any) -> None:
        super().__init__(message, exceptions)

    def derive(self, excs: Sequence[Exception]) -> LoadExtensionsError:  # type: ignore[override]
        return LoadExtensionsError(self.message, excs, loaded=self.loaded, failed=self.failed)

    def __str__(self) -> str:
        lines = [f"{self.message}:"]
        for name, exc in self.failed.items():
            if any(exc is mine for mine in self.exceptions):  # a split group shows its own part
                first = str(exc).splitlines()[0] if str(exc) else ""
                lines.append(f"  - {name}: {type(exc).__name__}: {first}")
        return "\n".join(lines)
