"""Configs as pyisolate 0.10 hosts write them: plain mappings, and that version's keys.

pyisolate 0.10 took its configs as dicts (TypedDicts), with a few keys of its own. Here a
mapping is checked key by key and then built into the config class, so it is validated
exactly like keyword arguments; the 0.10 keys that name a capability pyisolate has are
fields of ``ExtensionConfig`` (checked by ``check_upstream_keys``), those that name one it
has not are refused here, each with what to use instead (docs/guides/migrating-from-0.10.md).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import TypeVar

from .errors import ConfigError

__all__ = ["EXECUTION_MODELS", "check_upstream_keys", "config_from"]

T = TypeVar("T")

#: ``ExtensionConfig.execution_model``: None (no constraint) or one of these.
EXECUTION_MODELS = ("host-coupled", "sealed_worker")

_CONDA = (
    "conda/pixi environments are not supported: extension venvs are built with uv from PyPI-style indexes; "
    "list the packages in dependencies (find_links or extra_index_urls reach wheels kept elsewhere)"
)
#: 0.10 keys that name nothing pyisolate does, and why (with the fix).
_REFUSED = {
    "module": "is not used: module_path names the extension's code; remove it",
    "conda_channels": f"is refused: {_CONDA}",
    "conda_dependencies": f"is refused: {_CONDA}",
    "conda_platforms": f"is refused: {_CONDA}",
    "conda_python": f"is refused: {_CONDA}",
}


def config_from(cls: type[T], value: object, where: str) -> T:
    """``value`` if it is a ``cls``, else ``cls(**value)`` for a mapping whose keys are its fields.

    Raises:
        ConfigError: ``value`` is neither; a key is not a field of ``cls`` (the message
            suggests the closest and lists them all) or is a 0.10 key pyisolate refuses; or
            the values are invalid, as ``cls(**value)`` says.
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} needs an {cls.__name__} or a mapping of its fields (a dict), got {value!r}")
    known = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    for key in value:
        if key in _REFUSED:
            raise ConfigError(f"{where}: {cls.__name__} key {key!r} {_REFUSED[key]}")
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"{where}: unknown {cls.__name__} key {key!r}; {hint}known keys: {', '.join(known)}")
    return cls(**dict(value))


def check_upstream_keys(name: str, *, share_torch: bool, share_cuda_ipc: object, execution_model: object,
                        sealed_host_ro_paths: object, package_manager: object) -> None:
    """Check the fields that came from pyisolate 0.10 against each other.

    Raises:
        ConfigError: naming the field, the value and the fix.
    """
    where = f"(extension {name!r})"
    if package_manager != "uv":
        if package_manager == "conda":
            raise ConfigError(f"ExtensionConfig.package_manager='conda' {where} is refused: {_CONDA}")
        raise ConfigError(f"ExtensionConfig.package_manager {where} must be 'uv' (venvs are built with uv), "
                          f"got {package_manager!r}; remove it")
    if share_cuda_ipc is not None and not isinstance(share_cuda_ipc, bool):
        raise ConfigError(f"ExtensionConfig.share_cuda_ipc {where} must be True, False or None, got {share_cuda_ipc!r}")
    if execution_model is not None and execution_model not in EXECUTION_MODELS:
        raise ConfigError(f"ExtensionConfig.execution_model {where} must be None or one of "
                          f"{', '.join(map(repr, EXECUTION_MODELS))}, got {execution_model!r}")
    if execution_model == "sealed_worker":
        for flag, on in (("share_cuda_ipc", share_cuda_ipc), ("share_torch", share_torch)):
            if on:
                raise ConfigError(
                    f"ExtensionConfig.execution_model='sealed_worker' {where} shares nothing from the host but the "
                    f"folders in host_paths (sealed_host_ro_paths), yet {flag}=True; set {flag}=False, or "
                    "execution_model='host-coupled'"
                )
    elif sealed_host_ro_paths:
        raise ConfigError(
            f"ExtensionConfig.sealed_host_ro_paths {where} is only valid with execution_model='sealed_worker'; "
            "set that, or list the folders in host_paths"
        )
    if share_cuda_ipc and not share_torch:
        raise ConfigError(
            f"ExtensionConfig.share_cuda_ipc=True {where} needs share_torch=True: a CUDA tensor is opened by the "
            "host's own torch on the other side; set share_torch=True, or leave share_cuda_ipc unset"
        )
