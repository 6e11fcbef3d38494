"""What a host lets its extensions reach: the sandbox policy, and the mode that says what
happens where this machine cannot enforce it (resource limits are ``_limits``).

Pure data, validated at construction, below the configs that hold them. The host's policy
(``ExtensionManagerConfig``) is a ceiling: an extension's own (``ExtensionConfig`` or its
manifest) may only narrow it. The mechanisms that enforce a policy live in
``pyisolate._host.sandbox``.
"""

from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

__all__ = ["MODES", "SandboxMode", "SandboxPolicy", "check_mode", "narrower_mode"]

#: From least to most strict. ``preferred`` confines with what this machine offers and says
#: once what it could not; ``required`` refuses to start a worker it cannot fully confine.
MODES = ("disabled", "preferred", "required")


class SandboxMode(enum.StrEnum):
    """The sandbox modes, for code that prefers names to strings.

    Accepted wherever a mode string is (``sandbox_mode=SandboxMode.REQUIRED`` is
    ``sandbox_mode="required"``); configs store the plain string.
    """

    PREFERRED = "preferred"
    """Confine each worker as far as this machine can, and say once what it cannot."""
    REQUIRED = "required"
    """Refuse to start a worker that cannot be fully confined."""
    DISABLED = "disabled"
    """Run workers unconfined."""


def check_mode(value: object, where: str) -> str:
    """Return ``value`` as a mode string if it is a sandbox mode, else raise ConfigError naming ``where``."""
    if isinstance(value, SandboxMode):
        return value.value
    if not isinstance(value, str) or value not in MODES:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, MODES))} (or a pyisolate.SandboxMode), "
                          f"got {value!r}")
    return value


def narrower_mode(mode: str | None, ceiling: str, where: str) -> str:
    """The extension's mode, which may be stricter than the host's but never looser."""
    if mode is None:
        return ceiling
    if MODES.index(mode) < MODES.index(ceiling):
        raise ConfigError(
            f"{where} is {mode!r}, looser than the host's sandbox_mode {ceiling!r}; an extension may only "
            f"narrow the host's policy: remove it, or set ExtensionManagerConfig(sandbox_mode={mode!r})"
        )
    return mode


def _unknown(where: str, key: object, known: tuple[str, ...]) -> ConfigError:
    near = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return ConfigError(f"{where}: unknown key {key!r}; {hint}known: {', '.join(known)}")


def _paths(value: object, where: str) -> tuple[Path, ...]:
    if isinstance(value, Mapping):
        raise ConfigError(
            f"{where} maps paths to other places ({dict(value)!r}, a mount as pyisolate 0.10 took it); workers "
            f"see paths where they are: list them, e.g. {[str(source) for source in value]!r}"
        )
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of absolute paths, got {value!r}; write [{value!r}]")
    out = []
    for index, item in enumerate(value):
        if not isinstance(item, (str, os.PathLike)) or not str(item):
            raise ConfigError(f"{where}[{index}] must be a path, got {item!r}")
        path = Path(item).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"{where}[{index}] {str(item)!r} is relative; give an absolute path")
        out.append(Path(os.path.normpath(path)))
    return tuple(out)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


@dataclass(frozen=True, kw_only=True)
class SandboxPolicy:
    """What a confined worker may reach besides its own code, venv and a private temp dir.

    Args:
        network: Sockets to other hosts and to the host's loopback (TCP, UDP, name lookups).
            The connection to the host always works.
        writable_paths: Folders (or files) the worker may read and write. (Those every worker
            writes anyway, such as ``/dev/shm``, need no grant; listed, they ask for nothing.)
        readonly_paths: Folders (or files) the worker may read.

    ``ExtensionConfig(sandbox={"network": False, "writable_paths": [...]})`` and the manifest's
    ``[tool.pyisolate.sandbox]`` table use the same keys.
    """

    network: bool = False
    writable_paths: tuple[Path, ...] = ()
    readonly_paths: tuple[Path, ...] = ()

    _KEYS = ("network", "writable_paths", "readonly_paths")

    def __post_init__(self) -> None:
        if not isinstance(self.network, bool):
            raise ConfigError(f"SandboxPolicy.network must be True or False, got {self.network!r}")
        object.__setattr__(self, "writable_paths", _paths(self.writable_paths, "SandboxPolicy.writable_paths"))
        object.__setattr__(self, "readonly_paths", _paths(self.readonly_paths, "SandboxPolicy.readonly_paths"))

    @classmethod
    def parse(cls, value: object, where: str) -> SandboxPolicy | None:
        """A policy from a SandboxPolicy, a mapping with its keys, or None."""
        if value is None or isinstance(value, SandboxPolicy):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where} must be a SandboxPolicy or a mapping like {{'network': False, 'writable_paths': [...]}}, "
                f"got {value!r}"
            )
        for key in value:
            if key not in cls._KEYS:
                raise _unknown(where, key, cls._KEYS)
        try:
            return cls(**value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def within(self, ceiling: SandboxPolicy, where: str) -> SandboxPolicy:
        """This policy, checked to ask for nothing the host's ``ceiling`` does not allow."""
        fix = "or allow it in ExtensionManagerConfig(sandbox=...)"
        if self.network and not ceiling.network:
            raise ConfigError(f"{where} asks for network access, which the host's policy denies; remove it, {fix}")
        for path in self.writable_paths:
            if not _inside(path, ceiling.writable_paths):
                raise ConfigError(
                    f"{where} asks to write {str(path)!r}, which the host's policy does not let extensions write; "
                    f"remove it, {fix}"
                )
        for path in self.readonly_paths:
            if not _inside(path, ceiling.readonly_paths + ceiling.writable_paths):
                raise ConfigError(
                    f"{where} asks to read {str(path)!r}, which the host's policy does not let extensions read; "
                    f"remove it, {fix}"
                )
        return self
