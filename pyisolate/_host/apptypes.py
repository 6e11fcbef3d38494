"""The host's side of the application's registered types (``ExtensionManagerConfig.types``).

The host runs the registering function once per manager; each worker runs the same function
(``workers.loader.load_types``) before any extension code, with the folder the module is
imported from on its ``sys.path`` and, under the sandbox, readable.
"""

from __future__ import annotations

import importlib
import os
import site
import sys
import sysconfig
from pathlib import Path

from pyisolate.workers.loader import load_types

from .._wire import TypeRegistry
from ..errors import ConfigError

__all__ = ["AppTypes", "load_app_types"]


class AppTypes:
    """The host's registry, the reference workers import, and the folder they import it from."""

    def __init__(self, registry: TypeRegistry, reference: str, root: Path) -> None:
        self.registry, self.reference, self.root = registry, reference, root


def load_app_types(reference: str) -> AppTypes:
    """Run ``"module:function"`` on a new registry, in the host.

    Raises:
        ConfigError: it cannot be imported or run, or its module lives in the host's
            site-packages (a worker would then see every host package); the message says how to fix it.
    """
    where = f"ExtensionManagerConfig.types={reference!r}"
    module_name = reference.partition(":")[0]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"{where}: module {module_name!r} cannot be imported in the host: {type(exc).__name__}: "
                          f"{exc}") from exc
    file = getattr(module, "__file__", None)
    if file is None:
        raise ConfigError(f"{where}: module {module_name!r} has no source file, so workers cannot import it; "
                          "define the function in a module file of your application")
    folder = Path(file).resolve().parent
    if Path(file).name == "__init__.py":
        folder = folder.parent
    for _ in range(module_name.count(".")):
        folder = folder.parent
    if folder in _site_dirs():
        raise ConfigError(
            f"{where}: module {module_name!r} is imported from the host's site-packages ({folder}); workers import "
            "it from the folder it lives in, and that one would hand them every package of the host. Put the "
            "function in your application's own source tree (the folder you pass as host_paths)")
    try:
        registry = load_types(reference)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"{where} could not be run in the host: {type(exc).__name__}: {exc}") from exc
    return AppTypes(registry, reference, folder)


def _site_dirs() -> set[Path]:
    paths = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # some virtualenv layouts lack it
        pass
    paths.update(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))
    return {Path(p).resolve() for p in paths if p}
