"""Find extensions: the folders of an extensions directory, and installed entry points.

An installed distribution advertises an extension with an entry point in the group
``pyisolate.extensions``; its name is the extension's name, its value the module or package
whose directory (or ``.py`` file) is the extension::

    [project.entry-points."pyisolate.extensions"]
    my_ext = "my_ext_package"

The module is located with import machinery that reads the file system only: nothing of an
extension is imported in the host.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._config import ExtensionConfig
from .errors import ConfigError, DiscoveryError

__all__ = ["ENTRY_POINT_GROUP", "discover", "extension_dirs"]

ENTRY_POINT_GROUP = "pyisolate.extensions"
_MARKERS = ("__init__.py", "pyproject.toml")

StrPath = str | os.PathLike[str]


def extension_dirs(directory: StrPath) -> list[Path]:
    """Return the extension folders of ``directory``, sorted by name.

    A folder is an extension when it holds an ``__init__.py`` or a ``pyproject.toml``; hidden
    folders (``.name``) and ``__pycache__`` are skipped.

    Raises:
        ConfigError: ``directory`` is not a directory.
    """
    root = Path(directory).expanduser().absolute()
    if not root.is_dir():
        raise ConfigError(f"extensions directory {str(root)!r} does not exist or is not a directory")
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name == "__pycache__" or not entry.is_dir():
            continue
        if any((entry / marker).is_file() for marker in _MARKERS):
            found.append(entry)
    return found


def _locate(module: str) -> Path:
    """Return the directory of package ``module`` (or the file of a module), importing nothing.

    ``importlib.util.find_spec("a.b")`` would import ``a``; so each level is looked up with
    the path finder in the search locations of the level above.
    """
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
        for depth in range(1, len(parts)):
            if spec is None or spec.submodule_search_locations is None:
                spec = None
                break
            name = ".".join(parts[: depth + 1])
            spec = importlib.machinery.PathFinder.find_spec(name, list(spec.submodule_search_locations))
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot look up module {module!r}: {exc}") from None
    if spec is None:
        raise ConfigError(f"no module named {module!r} is installed in this environment")
    origin = spec.origin if spec.has_location else None
    if origin is None:
        raise ConfigError(f"module {module!r} has no __init__.py (a namespace package?); an extension "
                          "package needs one")
    path = Path(origin)
    if spec.submodule_search_locations is not None:
        return path.parent
    if path.suffix != ".py":
        raise ConfigError(f"module {module!r} is {path.name}, not Python source; name a package or a .py module")
    return path


def _entry_point_candidates() -> list[tuple[str, Path | ConfigError, str]]:
    found: list[tuple[str, Path | ConfigError, str]] = []
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = point.dist.name if point.dist is not None else "an unknown distribution"
        source = f"entry point {point.name!r} of {dist} (group {ENTRY_POINT_GROUP!r})"
        value = point.value.strip()
        located: Path | ConfigError
        if ":" in value or not value:
            located = ConfigError(f"{source}: its value {point.value!r} must name a module or package, "
                                  "e.g. my_ext = \"my_ext_package\", not an object inside one")
        else:
            try:
                located = _locate(value)
            except ConfigError as exc:
                located = ConfigError(f"{source}: {exc}; is {dist} installed correctly?")
        found.append((point.name, located, source))
    return found


def discover(
    directory: StrPath | Iterable[StrPath] | None = None, *, entry_points: bool = True, **overrides: Any
) -> list[ExtensionConfig]:
    """Find every extension in ``directory`` and among installed entry points; build their configs.

    Each folder of ``directory`` holding an ``__init__.py`` or a ``pyproject.toml`` is one
    extension, configured by ``ExtensionConfig.from_path(folder)``. With ``entry_points``, so
    is each entry point of the group ``pyisolate.extensions`` (named after the entry point).
    Nothing found is imported in the host.

    Args:
        directory: A directory of extension folders, several, or None (entry points only).
        entry_points: Also collect the extensions that installed distributions advertise.
        **overrides: ExtensionConfig fields set on every config (e.g. ``apis=[...]``),
            overriding the manifests; not ``name`` nor ``module_path``.

    Returns:
        The configs: directory extensions first (by folder name), then entry points.

    Raises:
        ConfigError: ``directory`` is not a directory.
        DiscoveryError: some extensions are invalid (bad manifest, module not found) or share a
            name (those are all dropped); ``.problems`` says each, ``.configs`` holds the rest.
        TypeError: an override is not an ExtensionConfig field, or is ``name``/``module_path``.
    """
    for field in ("name", "module_path"):
        if field in overrides:
            raise TypeError(f"discover() cannot override {field!r}: each extension has its own")
    if directory is None:
        directories: list[StrPath] = []
    elif isinstance(directory, (str, os.PathLike)):
        directories = [directory]
    else:
        directories = list(directory)
    candidates: list[tuple[str | None, Path | ConfigError, str]] = []
    for root in directories:
        candidates += [(None, path, f"folder {path}") for path in extension_dirs(root)]
    if entry_points:
        candidates += _entry_point_candidates()

    problems: list[ConfigError] = []
    built: list[tuple[ExtensionConfig, str]] = []
    for name, located, source in candidates:
        if isinstance(located, ConfigError):
            problems.append(located)
            continue
        try:
            named = overrides if name is None else {**overrides, "name": name}
            built.append((ExtensionConfig.from_path(located, **named), source))
        except ConfigError as exc:
            problems.append(exc if name is None else ConfigError(f"{source}: {exc}"))

    sources: dict[str, list[str]] = {}
    for config, source in built:
        sources.setdefault(config.name, []).append(source)
    for name, where in sources.items():
        if len(where) > 1:
            problems.append(ConfigError(
                f"extension name {name!r} is used by {len(where)} extensions: {'; '.join(where)}; "
                "rename all but one ([tool.pyisolate].name in its pyproject.toml, or the entry point)"
            ))
    configs = [config for config, _ in built if len(sources[config.name]) == 1]
    if problems:
        raise DiscoveryError(problems, configs)
    return configs
