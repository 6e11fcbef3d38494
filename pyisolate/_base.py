"""ExtensionBase: the class an extension (or the host application) subclasses."""

from __future__ import annotations

from collections.abc import Awaitable
from types import ModuleType

__all__ = ["ExtensionBase", "LIFECYCLE_HOOKS"]

#: Hook names the framework calls itself; they are not callable remotely.
LIFECYCLE_HOOKS = frozenset({"before_module_loaded", "on_module_loaded", "stop"})


class ExtensionBase:
    """Base class of extensions. Every public method of a subclass is callable from the host.

    Hooks, each called once, in this order, in the process that runs the extension:

    1. ``before_module_loaded()`` of the class given to the manager, before the extension's
       module is imported. When the module defines its own subclass, that class serves the
       calls; if it overrides ``before_module_loaded`` too, the override runs right after
       the import (the class cannot exist earlier), just before ``on_module_loaded``.
    2. ``on_module_loaded(module)`` with the imported extension module.
    3. Calls from the host and other actors.
    4. ``stop()`` when the extension is stopped, before its process exits.

    Hooks and methods may be plain functions or coroutine functions. Plain methods run in
    a thread pool of the extension's process, so a slow one does not hold up others;
    coroutine methods run on the extension's event loop.
    """

    def before_module_loaded(self) -> None | Awaitable[None]:
        """Prepare before the extension's module is imported."""
        return None

    def on_module_loaded(self, module: ModuleType) -> None | Awaitable[None]:
        """Receive the imported extension module."""
        return None

    def stop(self) -> None | Awaitable[None]:
        """Release what the extension holds; called once when it is stopped."""
        return None
