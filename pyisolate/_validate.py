"""Checks of what names an extension and what goes into its venv, wanted by the config, the
manifest reader and the venv builder alike (so they live below all three).

``validate_extension_name``: safe as an actor name and as a directory name.
``validate_dependencies``: PEP 508 requirements that uv cannot mistake for options.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from packaging.requirements import InvalidRequirement, Requirement

from .errors import ConfigError

__all__ = ["validate_dependencies", "validate_extension_name"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RESERVED_NAMES = frozenset({"host"})
# Not PEP 508, and meaningful to a shell or to uv's argument parser.
_FORBIDDEN_CHARS = frozenset("`$|&\\{}\n\r\x00")
_FIX = "give a requirement like 'numpy<2'"
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")


def validate_extension_name(name: str) -> str:
    """Check that an extension name is safe as an actor name and as a directory name.

    Args:
        name: the extension's name.

    Returns:
        The name, unchanged.

    Raises:
        ConfigError: the name is not 1-64 of ``A-Z a-z 0-9 _ . -`` starting with a letter or
            digit, contains ``..``, or is the reserved name ``host``.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"invalid extension name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit and without '..'"
        )
    if name in _RESERVED_NAMES:
        raise ConfigError(f"invalid extension name {name!r}: it is reserved for the host actor")
    return name


def validate_dependencies(
    dependencies: Sequence[str], *, allow_direct_references: bool = False
) -> tuple[str, ...]:
    """Check each dependency is a PEP 508 requirement that uv cannot mistake for an option.

    Args:
        dependencies: requirement strings such as ``"numpy<2"``.
        allow_direct_references: also accept ``name @ url`` and existing local paths.

    Returns:
        The requirements, stripped of surrounding whitespace, in their original order.

    Raises:
        ConfigError: an item is not a string, starts with ``-``, holds a character outside
            PEP 508, cannot be parsed, or is a direct reference that is not allowed.
    """
    if isinstance(dependencies, (str, bytes)):
        raise ConfigError(
            f"dependencies must be a list of requirement strings, not {dependencies!r}; "
            f"write [{dependencies!r}]"
        )
    return tuple(_validate_one(item, allow_direct_references) for item in dependencies)


def _validate_one(item: object, allow_direct: bool) -> str:
    if not isinstance(item, str):
        raise ConfigError(f"dependency {item!r} is a {type(item).__name__}; {_FIX}")
    bad = sorted(_FORBIDDEN_CHARS.intersection(item))
    if bad:
        shown = ", ".join(map(repr, bad))
        raise ConfigError(f"dependency {item!r} contains {shown}, not allowed by PEP 508; {_FIX}")
    spec = item.strip()
    if not spec:
        raise ConfigError(f"dependency {item!r} is empty; {_FIX}")
    if spec.startswith("-"):
        raise ConfigError(
            f"dependency {item!r} starts with '-' and would be read as a uv option; {_FIX} "
            "(set index options through UV_INDEX_URL and friends)"
        )
    direct = f"dependency {item!r} is a direct reference (URL or local path); {_FIX} or set "
    direct += "allow_direct_references=True"
    requirement: Requirement | None = None
    problem = ""
    try:
        requirement = Requirement(spec)
    except InvalidRequirement as exc:
        problem = str(exc)
    if requirement is not None and requirement.url:  # name @ url
        if not allow_direct:
            raise ConfigError(direct)
        return spec
    # uv reads a bare name ending in an archive suffix as a file path, so check those too.
    archive = spec.lower().endswith(_ARCHIVE_SUFFIXES)
    if requirement is not None and not archive:
        return spec
    if not ("/" in spec or spec.startswith(".") or archive):
        raise ConfigError(f"dependency {item!r} is not a PEP 508 requirement: {problem}")
    if not allow_direct:
        raise ConfigError(direct)
    if not os.path.exists(spec):
        raise ConfigError(f"dependency {item!r}: no such local path")
    return spec
