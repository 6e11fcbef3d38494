"""``pyisolate keys`` (CURVE key pairs) and ``pyisolate worker`` (a remote worker): see
docs/guides/remote.md.

``pyisolate worker --connect tcp://HOST:PORT --server-key KEY --key FILE EXTENSION_DIR`` runs
on the machine that should host the extension: it builds the extension's venv there (the same
builder, fingerprints and progress as the host's), then runs the worker in it, which joins the
host's broker over tcp + CURVE. It stays up: when the worker leaves (a partition made the host
silent, its process crashed), it starts another that rejoins, with a backoff. It exits 0 when
the host stops the extension, 1 when the extension fails to load, cannot be confined as
``--sandbox-mode required`` asks, or the first join cannot be made within ``--join-timeout``.

The worker is confined on this machine as a local one is on the host's (``--sandbox-mode``,
default ``preferred``): Landlock and seccomp, with TCP connects allowed to the host's port
only; this command's ``--sandbox-*`` options are the ceiling (the host's policy, here), the
extension's manifest narrows it, and its limits apply.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyisolate.workers.exits import EXIT_CONFINE, EXIT_HANDSHAKE, EXIT_HOST_GONE, EXIT_LOAD_FAILED, EXIT_OK

from .._config import ExtensionConfig, ExtensionManagerConfig
from .._curve import create_key_files, public_key, secret_key
from .._envs import ProgressDisplay, ensure_venv, runtime_dir
from .._policy import SandboxPolicy
from ..errors import ConfigError, EnvironmentBuildError, ExtensionLoadError
from .output import EXIT_FAILED, UsageError, error, print_json

if TYPE_CHECKING:
    from .._host import Resolved

__all__ = ["COMMANDS"]

logger = logging.getLogger("pyisolate.worker")

#: One join attempt's wait for the broker's answer (a key the host does not allow gets none).
_ATTEMPT_SECONDS = 30.0
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 5.0


# -- keys ----------------------------------------------------------------------------------


def _keys_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="whose key pair: 'host', or an extension's name")
    parser.add_argument("--dir", type=Path, default=Path("."), metavar="DIR",
                        help="where to write NAME.key and NAME.key_secret (mode 0600; default: here)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _keys(args: argparse.Namespace) -> int:
    made: list[dict[str, str]] = []
    for name in args.names:
        if not name or "/" in name or name.startswith("."):
            raise UsageError(f"{name!r} is not a key name (no '/', no leading '.')")
        try:
            public_path, secret_path, pair = create_key_files(args.dir, name)
        except FileExistsError as exc:
            error(f"{exc.filename} exists; keys are never overwritten: remove it, or pick another --dir")
            return EXIT_FAILED
        made.append({"name": name, "public_key": pair.public, "public_file": str(public_path),
                     "secret_file": str(secret_path)})
    if args.json:
        print_json({"keys": made})
    else:
        for entry in made:
            print(f"{entry['name']}: public key {entry['public_key']}")
            print(f"  {entry['public_file']} (share it), {entry['secret_file']} (keep it secret, mode 0600)")
    return 0


# -- worker --------------------------------------------------------------------------------


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("extension_dir", type=Path, metavar="EXTENSION_DIR", help="the extension's directory here")
    parser.add_argument("--connect", required=True, metavar="tcp://HOST:PORT", help="the host's listener")
    parser.add_argument("--server-key", required=True, metavar="KEY",
                        help="the host's public key: Z85 text or its .key file")
    parser.add_argument("--key", required=True, metavar="FILE",
                        help="this worker's secret key: its .key_secret file, Z85 text, or env:VARIABLE")
    parser.add_argument("--name", default=None, help="the extension's name (default: as its manifest says)")
    parser.add_argument(
        "--venv-root", type=lambda s: Path(s).expanduser().absolute(), default=None, metavar="DIR",
        help="where to build the extension's venv (default: $PYISOLATE_VENV_ROOT, else ./venvs)")
    parser.add_argument("--join-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up when the first join has not succeeded by then (default 60)")
    parser.add_argument(
        "--sandbox-mode", choices=("preferred", "required", "disabled"), default="preferred",
        help="confine the worker as far as this machine can (preferred, the default), refuse to run it "
             "otherwise (required), or run it unconfined (disabled)")
    parser.add_argument("--sandbox-network", action="store_true",
                        help="let the extension open network connections beyond the one to the host")
    parser.add_argument("--sandbox-read", action="append", default=[], type=_absolute, metavar="DIR",
                        help="a folder the extension may read (repeatable): where its host_paths, apis or "
                             "types live on this machine, data it needs")
    parser.add_argument("--sandbox-write", action="append", default=[], type=_absolute, metavar="DIR",
                        help="a folder the extension may write (repeatable)")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help="a resource limit of the worker (repeatable): memory=4GiB, cpu=1.5, processes=64, "
                             "open_files=1024; the manifest's limits may only be lower")


def _absolute(value: str) -> Path:
    return Path(value).expanduser().absolute()


def _worker(args: argparse.Namespace) -> int:
    host, _ = _host_port(args.connect)
    try:
        server = public_key(args.server_key, "--server-key")
        ours = secret_key(_key_text(args.key), "--key")
        config = ExtensionConfig.from_path(args.extension_dir, **({"name": args.name} if args.name else {}))
    except (ValueError, ConfigError) as exc:
        raise UsageError(str(exc)) from None
    if args.venv_root is None:
        from .output import default_venv_root

        args.venv_root = default_venv_root()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from .._host import resolve

    try:
        # This command's options play the host's part: the ceiling the manifest narrows.
        ceiling = ExtensionManagerConfig(
            venv_root_path=args.venv_root, sandbox_mode=args.sandbox_mode,
            sandbox=SandboxPolicy(network=args.sandbox_network, writable_paths=tuple(args.sandbox_write),
                                  readonly_paths=tuple(args.sandbox_read)),
            limits=_limits(args.limit) or None)
        resolved = resolve(config, ceiling)
    except ConfigError as exc:
        raise UsageError(_as_worker_options(str(exc))) from None
    if _confined_net(resolved) and host.startswith("["):
        raise UsageError(f"--connect {args.connect}: a confined worker reaches the host over IPv4 only (its "
                         "sandbox lets TCP through to the host's port over IPv4, nothing else); give an IPv4 "
                         "address or name of the host, or pass --sandbox-network")
    remote = {"endpoint": args.connect, "server_key": server, "public_key": ours.public, "secret_key": ours.secret,
              "name": config.name, "module_path": str(config.module_path), "share_torch": config.share_torch}
    try:
        return asyncio.run(_supervise(config, args.venv_root, remote, args.join_timeout, resolved))
    except (EnvironmentBuildError, ConfigError, ExtensionLoadError) as exc:
        error(str(exc))
        return EXIT_FAILED


def _limits(given: list[str]) -> dict[str, object]:
    """``--limit NAME=VALUE`` options as the mapping ``Limits.parse`` reads (numbers as numbers)."""
    limits: dict[str, object] = {}
    for option in given:
        name, equals, text = option.partition("=")
        if not equals or not text:
            raise UsageError(f"--limit takes NAME=VALUE (memory=4GiB, cpu=1.5, processes=64, open_files=1024), "
                             f"got {option!r}")
        value: object = text
        for number in (int, float):
            try:
                value = number(text)
                break
            except ValueError:
                pass
        limits[name.strip()] = value
    return limits


def _host_port(endpoint: str) -> tuple[str, int]:
    """``--connect``'s host and port."""
    host, colon, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--connect takes tcp://HOST:PORT, got {endpoint!r}")
    return host, int(port)


def _confined_net(resolved: Resolved) -> bool:
    """Whether the worker's sandbox leaves it TCP to the host's port alone (no DNS, no IPv6)."""
    return resolved.mode != "disabled" and not resolved.policy.network


async def _numeric(endpoint: str) -> str:
    """``endpoint`` with its host name looked up here, to IPv4: a confined worker cannot look
    names up itself (DNS is UDP, which its sandbox refuses). Looked up for each worker started,
    so a rejoin follows a name that moved.

    Raises:
        OSError: the name does not resolve now (``socket.gaierror``).
    """
    host, port = _host_port(endpoint)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return f"tcp://{infos[0][4][0]}:{port}"


def _as_worker_options(message: str) -> str:
    """A sandbox refusal said in this command's terms: its options are the host's policy here."""
    message = re.sub(r"set ExtensionManagerConfig\(sandbox_mode='(\w+)'\)", r"pass --sandbox-mode \1", message)
    message = message.replace("allow it in ExtensionManagerConfig(sandbox=...)",
                              "allow it with --sandbox-network, --sandbox-read DIR or --sandbox-write DIR")
    message = message.replace("ExtensionManagerConfig.limits.", "--limit ").replace(
        "ExtensionManagerConfig.limits", "--limit").replace(
        "the manager's ceiling", "this worker machine's ceiling (--limit)")
    return message.replace("the host's", "this worker machine's")


def _key_text(value: str) -> str:
    """``--key``: a file, Z85 text, or ``env:NAME``, the variable holding it (out of ``ps``'s sight:
    a launcher such as RayPlacement passes the key of its launch so)."""
    if not value.startswith("env:"):
        return value
    variable = value[4:]
    text = os.environ.get(variable)
    if not text:
        raise ValueError(f"--key {value}: the variable {variable} is not set")
    return text


async def _supervise(config: ExtensionConfig, root: Path, remote: dict[str, Any], join_timeout: float,
                     resolved: Resolved) -> int:
    """Build the venv, then run workers until the host stops the extension (see the module doc)."""
    with ProgressDisplay() as display:
        python = await ensure_venv(
            venv_root=root, name=config.name, dependencies=config.dependencies, share_torch=config.share_torch,
            allow_direct_references=config.allow_direct_references, sources=config.sources, progress=display)
    runtime = await asyncio.to_thread(runtime_dir, root, config.share_torch, False)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    deadline, joined, delay, tried = time.monotonic() + join_timeout, False, _BACKOFF_FIRST, False
    try:
        while True:
            attempt = min(_ATTEMPT_SECONDS, max(0.5, deadline - time.monotonic())) if not joined else _ATTEMPT_SECONDS
            endpoint = remote["endpoint"]
            try:
                endpoint = await _numeric(endpoint) if _confined_net(resolved) else endpoint
            except OSError as exc:
                logger.warning("cannot look up the host of %s: %s", endpoint, exc)
                code = EXIT_HANDSHAKE  # as a join that got no answer: tried again until the deadline
            else:
                code = await _run_one(config, resolved, python, runtime,
                                      {**remote, "endpoint": endpoint, "join_timeout": attempt}, announce=not tried)
                tried = True
            if code == EXIT_CONFINE:
                error(f"extension {config.name!r} could not be confined as --sandbox-mode required asks (its "
                      "stderr above says what failed); fix the system, or use --sandbox-mode preferred")
                return EXIT_FAILED
            if code == EXIT_OK:
                logger.info("the host stopped extension %r", config.name)
                return 0
            if code == EXIT_LOAD_FAILED:
                error(f"extension {config.name!r} failed to load (the host has the traceback)")
                return EXIT_FAILED
            if code == EXIT_HANDSHAKE:
                if not joined and time.monotonic() >= deadline:
                    error(f"could not join {remote['endpoint']} as {config.name!r} within {join_timeout:.0f} s: is "
                          "the host listening there, with this extension loaded as remote=True, and does its "
                          "allowlist hold this worker's public key under that name?")
                    return EXIT_FAILED
            else:
                joined = True
                delay = _BACKOFF_FIRST
                why = "the host went quiet" if code == EXIT_HOST_GONE else f"it exited with code {code}"
                logger.warning("the worker of %r left (%s); rejoining", config.name, why)
            await asyncio.sleep(delay)  # the backoff between attempts
            delay = min(delay * 2, _BACKOFF_MAX)
    except asyncio.CancelledError:
        return 128 + signal.SIGTERM
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _run_one(config: ExtensionConfig, resolved: Resolved, python: Path, runtime: Path,
                   remote: dict[str, Any], *, announce: bool) -> int:
    """Start one worker, confined, that joins the host at ``remote``; its exit code once it ends.
    ``announce``: log what confines it."""
    from .._host import WorkerProcess, extension_logger, prepare

    confinement = await asyncio.to_thread(
        prepare, config.name, resolved, venv=python.parent.parent, runtime=runtime,
        module_path=Path(config.module_path), class_files=(), broker_endpoint=remote["endpoint"],
        share_torch=config.share_torch)
    try:
        if announce:
            logger.info("extension %r runs confined by: %s", config.name,
                        ", ".join(confinement.enforced) or "nothing (--sandbox-mode disabled)")
        process = await WorkerProcess.spawn(
            name=config.name, python=python, runtime=runtime, log=extension_logger(config.name),
            before_boot=confinement.attach, sandbox=confinement.argv,
            boot={**confinement.boot(), "remote": remote,
                  "log_level": logging.getLogger("pyisolate.extension").getEffectiveLevel()},
            pass_env=tuple(config.pass_env), env={**config.env, **confinement.env()})
        try:
            return await process.wait()
        finally:
            await process.stop(2.0)
            await process.aclose()
    finally:
        confinement.close()


COMMANDS: dict[str, tuple[str, str, Any, Any]] = {
    "keys": ("make CURVE key pairs for a host and its remote workers",
             "Write NAME.key (public) and NAME.key_secret (both halves, mode 0600) for each NAME, and print "
             "the public keys. The host takes its secret file and each worker's public key "
             "(ExtensionManagerConfig(curve=CurveConfig(...))); a worker takes its secret file and the host's "
             "public key (pyisolate worker).", _keys_options, _keys),
    "worker": ("run an extension here, as a remote worker of a host on another machine",
               "Build the extension's venv here, then join the host's broker (tcp + CURVE) as the extension, and "
               "rejoin after a partition. The host loads it with ExtensionConfig(remote=True).",
               _worker_options, _worker),
}
