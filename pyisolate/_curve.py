"""CURVE keys for remote workers: the host's key pair, the allowlist, key files.

A key is 32 bytes, written as 40 characters of Z85. Key files use ZeroMQ's certificate format
(``zmq.auth.load_certificate`` reads them): ``NAME.key`` holds the public key,
``NAME.key_secret`` both halves, created with mode 0600. See docs/guides/remote.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

from ._validate import validate_extension_name
from .errors import ConfigError

__all__ = ["CurveConfig", "KeyPair", "create_key_files", "public_key", "secret_key", "worker_command"]

_Z85_LEN = 40


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, Z85 text."""

    public: str
    secret: str


def _z85(value: str, what: str) -> bytes:
    raw = value.strip().encode()
    if len(raw) != _Z85_LEN:
        raise ValueError(f"{what} must be 40 characters of Z85 (or a key file), got {len(raw)} characters")
    try:
        z85.decode(raw)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{what} is not valid Z85: {exc}") from None
    return raw


def _looks_z85(text: str) -> bool:
    try:
        _z85(text, "")
    except ValueError:
        return False
    return True


def _load(value: str | os.PathLike[str], what: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from Z85 text or a certificate file."""
    text = os.fspath(value)
    if isinstance(value, os.PathLike) or not _looks_z85(text):  # Z85 has '/' and '.': its shape decides
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"{what} is neither a key (40 characters of Z85) nor a key file: no file at {str(path)!r}")
        try:
            public, private = zmq.auth.load_certificate(path)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{what}: {str(path)!r} is not a ZeroMQ certificate file: {exc}") from None
        if secret and private is None:
            raise ValueError(f"{what}: {str(path)!r} holds no secret key (use the .key_secret file)")
        return public, private
    raw = _z85(text, what)
    if secret:
        return zmq.curve_public(raw), raw
    return raw, None


def secret_key(value: str | os.PathLike[str], what: str) -> KeyPair:
    """The key pair of a secret key given as Z85 text or a ``.key_secret`` file.

    Raises:
        ValueError: neither, with why.
    """
    public, private = _load(value, what, secret=True)
    assert private is not None
    return KeyPair(public.decode(), private.decode())


def public_key(value: str | os.PathLike[str], what: str) -> str:
    """A public key given as Z85 text or a ``.key`` file (a ``.key_secret`` one works too)."""
    return _load(value, what, secret=False)[0].decode()


@dataclass(frozen=True, kw_only=True)
class CurveConfig:
    """The host's CURVE identity for ``ExtensionManagerConfig.listen``, and who may join.

    Args:
        server_secret_key: The host's secret key: 40 characters of Z85, or the path of a
            ``.key_secret`` file (``pyisolate keys``). Its public half is what workers pass as
            ``--server-key``.
        workers: Extension name -> the public key of the worker allowed to join as it (Z85 or
            a ``.key`` file). One key, one extension: a key cannot join under another name.

    Raises:
        ConfigError: a key is malformed or missing, a name is invalid, or a key is listed twice.
    """

    server_secret_key: str | os.PathLike[str] = field(repr=False)
    workers: Mapping[str, str | os.PathLike[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            server = secret_key(self.server_secret_key, "CurveConfig.server_secret_key")
        except ValueError as exc:
            raise ConfigError(f"{exc}; make a key pair with `pyisolate keys host`") from None
        object.__setattr__(self, "_server", server)
        if not isinstance(self.workers, Mapping):
            raise ConfigError("CurveConfig.workers must map extension names to worker public keys")
        allowed: dict[bytes, str] = {}
        for name, key in self.workers.items():
            validate_extension_name(name)
            try:
                public = public_key(key, f"CurveConfig.workers[{name!r}]").encode()
            except ValueError as exc:
                raise ConfigError(f"{exc}; make a worker key pair with `pyisolate keys {name}`") from None
            if public in allowed:
                raise ConfigError(f"CurveConfig.workers: extensions {allowed[public]!r} and {name!r} have the same "
                                  "public key; give each worker its own key pair (`pyisolate keys NAME`)")
            if public == server.public.encode():
                raise ConfigError(f"CurveConfig.workers[{name!r}] is the host's own public key; give the worker "
                                  "its own key pair")
            allowed[public] = name
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "workers", dict(self.workers))

    @property
    def server(self) -> KeyPair:
        """The host's key pair."""
        pair: KeyPair = self.__dict__["_server"]
        return pair

    @property
    def allowed(self) -> dict[bytes, str]:
        """Worker public key (Z85 bytes) -> the extension it may join as."""
        return dict(self.__dict__["_allowed"])

    @classmethod
    def parse(cls, value: CurveConfig | Mapping[str, Any] | None) -> CurveConfig | None:
        """A CurveConfig from itself, a mapping of its fields, or None."""
        if value is None or isinstance(value, CurveConfig):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"server_secret_key", "workers"}
            if unknown:
                raise ConfigError(f"ExtensionManagerConfig.curve has unknown field(s) {sorted(unknown)}; "
                                  "it takes server_secret_key and workers")
            if "server_secret_key" not in value:
                raise ConfigError("ExtensionManagerConfig.curve needs server_secret_key (`pyisolate keys host`)")
            return cls(**value)
        raise ConfigError(f"ExtensionManagerConfig.curve must be a CurveConfig or a mapping, got {value!r}")


def create_key_files(directory: Path, name: str) -> tuple[Path, Path, KeyPair]:
    """Write a fresh key pair as ``directory/name.key`` and ``name.key_secret`` (both 0600).

    Raises:
        FileExistsError: either file exists (keys are never overwritten).
    """
    public, secret = zmq.curve_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    banner = "#   ZeroMQ CURVE {} certificate made by `pyisolate keys`\n"
    for path, text in ((public_path, banner.format("public") + _cert(public, None)),
                       (secret_path, banner.format("**secret**") + _cert(public, secret))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    return public_path, secret_path, KeyPair(public.decode(), secret.decode())


def _cert(public: bytes, secret: bytes | None) -> str:
    text = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def worker_command(*, name: str, connect: str, server_key: str, key_file: str | os.PathLike[str],
                   extension_dir: str | os.PathLike[str], venv_root: str | os.PathLike[str] | None = None,
                   python: str = "python3", sandbox: Sequence[str] = ()) -> list[str]:
    """The argv that runs extension ``name``'s remote worker on another machine, for a launcher.

    ``connect``: the host's listener as reachable from there (``tcp://HOST:PORT``);
    ``server_key``: the host's public key (Z85); ``key_file``: the worker's ``.key_secret`` file
    *on that machine*; ``extension_dir``, ``venv_root``: paths on that machine. The command joins
    the host under ``name`` (the host must have loaded it with ``ExtensionConfig(remote=True)``)
    and rejoins after a partition; it exits when the host stops the extension. ``sandbox``: its
    ``--sandbox-*`` and ``--limit`` options (``_host.remote.sandbox_options``), what confines it there.
    """
    argv = [python, "-m", "pyisolate", "worker", "--connect", connect, "--server-key", server_key,
            "--key", os.fspath(key_file), "--name", name, *sandbox]
    if venv_root is not None:
        argv += ["--venv-root", os.fspath(venv_root)]
    return [*argv, os.fspath(extension_dir)]
