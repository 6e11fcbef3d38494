"""The worker process: ``python -I -c <bootstrap> RUNTIME_DIR CHANNEL_FD`` started by the host.

The bootstrap has made the process non-dumpable already. The host sends the bootstrap JSON
(name, broker endpoint, launch secret, module path, host paths, extension class) as the first message on
our private control channel (descriptor CHANNEL_FD, a socketpair no other process can open),
which later carries shared-memory segments. Our stdin carries nothing: the host keeps the pipe
open, end-of-file on it means the host is gone, even if it was killed, and the worker exits at
once. Nothing here imports host-only code (manager, venv builder).

A remote worker (``pyisolate worker --connect``, on another machine) is started the same way
by that command, whose bootstrap holds ``remote`` (where the host is and the CURVE keys) and
the rules that command confines it by on its machine (applied first, as a local worker's).
It joins next, and the rest of its bootstrap comes in the broker's WELCOME, over the
authenticated connection. It shares no memory with the host (values go as buffer frames) and
exits when the host has gone quiet for ``heartbeat_timeout`` (the command then rejoins).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import io
import logging
import os
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyisolate._wire import shm

from . import exits
from .exits import EXIT_CONFINE, EXIT_HANDSHAKE, EXIT_HOST_GONE, EXIT_LOAD_FAILED, EXIT_OK

#: The host sends the bootstrap right after it starts us; past this it is gone or stuck.
_BOOT_TIMEOUT = 60.0
#: The longest a STOP may ask the calls being served to finish before the stop hook runs.
_MAX_DRAIN = 3600.0

logger = logging.getLogger("pyisolate.workers")


def _watch_host(stdin_fd: int) -> None:
    """Exit the process when the host closes our stdin (it exited or was killed)."""
    while True:
        try:
            chunk = os.read(stdin_fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
    try:  # the host reads our stderr: with it gone, this write may fail
        sys.stderr.write("pyisolate worker: the host process went away; exiting\n")
        sys.stderr.flush()
    finally:
        exits.exit_now(EXIT_HOST_GONE)


async def _serve(boot: dict[str, Any], channel: shm.WorkerChannel) -> int:
    from pyisolate.broker.protocol import HOST, Kind, pack_header

    from pyisolate._base import ExtensionBase
    from pyisolate._rpc import Endpoint, public_methods, set_worker_endpoint
    from pyisolate._singleton import ProxiedSingleton
    from pyisolate._wire import encode, encode_exception
    from pyisolate._wire import shm as _shm

    from .connection import Connection, HandshakeError
    from .loader import import_class, load_extension, load_types, trim_traceback

    gc.enable()  # the bootstrap paused it for the runtime's imports; extension code runs with it on
    remote = boot.get("remote")
    joined: Connection | None = None
    if remote is not None:
        try:
            joined, boot = _join_remote(remote, Connection)
        except HandshakeError as exc:
            logger.error("%s", exc)
            return EXIT_HANDSHAKE
    # The host's folders the extension may import from (ExtensionConfig.host_paths): after its
    # venv's packages and the runtime, so that neither the host's code nor its copies shadow them.
    for path in boot.get("host_paths", ()):
        if path not in sys.path:
            sys.path.append(path)
    loop = asyncio.get_running_loop()
    limits = boot.get("limits", {})
    conn = joined or Connection(boot["endpoint"], max_message_size=limits.get("max_message_size", -1),
                                max_queued_bytes=limits.get("max_queued_bytes", 1 << 30))
    finished = asyncio.Event()
    stop_tasks: set[asyncio.Task[None]] = set()

    def send(dest: bytes, frames: list[Any]) -> None:
        conn.send([dest, *frames])

    def on_control(sender: bytes, kind: Kind, call_id: int, extra: list[object], body: bytes,
                   buffers: list[bytes]) -> None:
        if kind is Kind.STOP and sender == HOST and not stop_tasks:
            drain = float(extra[0]) if extra and isinstance(extra[0], (int, float)) else 0.0
            task = loop.create_task(_stop(call_id, min(drain, _MAX_DRAIN) if drain > 0 else 0.0))
            stop_tasks.add(task)

    async def _stop(call_id: int, drain: float) -> None:
        try:
            if drain:  # replaced by a reload: calls that reached this worker finish first
                await endpoint.server.idle(drain)
            instance = endpoint.root
            result = instance.stop() if isinstance(instance, ExtensionBase) else None
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            logger.exception("stop() of the extension failed")
            body, buffers = encode_exception(exc)
            if ship_spans is not None:  # the host has them all by the time it has the answer
                ship_spans()
            send(HOST, [pack_header(Kind.ERROR, call_id), body, *buffers])
        else:
            if ship_spans is not None:
                ship_spans()
            send(HOST, [pack_header(Kind.RESULT, call_id), encode(None)[0]])
        finished.set()

    name = boot["name"]
    _shm.configure(boot["session"], name, source=channel if remote is None else None,
                   trusted=frozenset(n.encode() for n in boot["host_actors"]),
                   pool_bytes=boot.get("shm_pool_bytes"))
    endpoint = Endpoint(name.encode(), loop, send, on_control=on_control,
                        max_in_flight=limits.get("max_in_flight", 512),
                        max_message_size=limits.get("max_message_size", 256 << 20))
    endpoint.server.on_system_exit = exits.leave  # the worker exits with its code; the call fails as a crash
    endpoint.host_actors = frozenset(n.encode() for n in boot["host_actors"])
    ship_spans = _trace(loop, send, endpoint) if boot.get("tracing") else None
    if not boot.get("cuda_ipc", True):  # ExtensionConfig.share_cuda_ipc off: no CUDA tensor in or out
        refusal = (f"this extension ({name!r}) does not share CUDA tensors (share_cuda_ipc is off); load it with "
                   "share_torch=True and share_cuda_ipc=True to share them")
        endpoint.values.cuda_refusal = lambda peer: refusal
    if boot.get("share_torch"):
        # Now, while nothing is served: imported on the serving loop by the first tensor to
        # arrive, torch (seconds of CPU) would hold every call and heartbeat back that long.
        import torch  # noqa: F401
    try:
        try:
            if joined is None:
                conn.handshake(name, bytes.fromhex(boot["secret"]), timeout=float(boot["handshake_timeout"]))
            endpoint.calls.moved.update(conn.moves)  # where reloaded extensions' names point now
            _shm.apart.update(conn.apart)  # who is on another machine: values for them go as frames
        except HandshakeError as exc:
            logger.error("%s", exc)
            return EXIT_HANDSHAKE
        # Serve from here on: the extension may call other actors while it loads.
        conn.start(loop, lambda frames: endpoint.on_frames(frames[0], frames[1:]))
        set_worker_endpoint(endpoint)
        # Before any extension code: its descendants stay ours, SIGTERM takes them along, and a
        # SystemExit (from a method, a hook, a task) ends the worker after what it sent has left.
        exits.install(close=functools.partial(conn.close, flush=True))
        try:
            if boot.get("types"):  # the application's types, known before any of its code runs
                endpoint.types = _app_types(boot["types"], load_types)
            for spec in boot["apis"]:  # the host modules defining shared singletons
                import_class(spec, ProxiedSingleton)
            base = import_class(boot["extension_class"]) if boot["extension_class"] else ExtensionBase
            instance = await load_extension(boot["module_path"], base)
        except Exception as exc:
            # Reported once, by the host's ExtensionLoadError, which carries the traceback (from
            # the extension's own frames: the loader's are dropped). Not logged here as well.
            logger.debug("extension %r failed to load", name)
            body, buffers = encode_exception(trim_traceback(exc))
            send(HOST, [pack_header(Kind.LOAD_FAILED), body, *buffers])
            conn.close(flush=True)
            return EXIT_LOAD_FAILED
        endpoint.root = instance
        send(HOST, [pack_header(Kind.READY), encode({"methods": public_methods(instance)})[0]])
        watch = (loop.create_task(_watch_remote_host(conn, float(boot["heartbeat_timeout"])))
                 if remote is not None else None)
        await finished.wait()
        if watch is not None:
            watch.cancel()
        await endpoint.aclose()
        conn.close(flush=True)
        return EXIT_OK
    finally:
        set_worker_endpoint(None)
        conn.close()


#: Refusals of a remote worker's HELLO that end by themselves (see ``broker.registry``).
_TRANSIENT = ("is starting", "is taken")


def _join_remote(remote: dict[str, Any], connection: Any) -> tuple[Any, dict[str, Any]]:
    """Join the host over tcp + CURVE; return the connection and the bootstrap its WELCOME carried.

    Raises:
        HandshakeError: refused, not answered (a key the host does not allow gets no answer at
            all: its handshake never completes), or a WELCOME without a bootstrap.
    """
    import msgpack

    from .connection import HandshakeError

    import time

    conn = connection(remote["endpoint"], curve=(remote["server_key"].encode(), remote["public_key"].encode(),
                                                  remote["secret_key"].encode()))
    deadline = time.monotonic() + float(remote["join_timeout"])
    try:
        while True:
            try:
                body = conn.handshake(remote["name"], b"", timeout=max(0.1, deadline - time.monotonic()))
                break
            except HandshakeError as exc:
                # The host is not expecting us yet (a restart's backoff) or still holds our last
                # connection: ask again on this connection, rather than start a new process.
                if not any(word in str(exc) for word in _TRANSIENT) or time.monotonic() > deadline - 0.25:
                    raise
                time.sleep(0.2)  # the pause between two HELLOs (nothing else runs yet)
        try:
            boot = msgpack.unpackb(body, raw=False) if body else None
        except (ValueError, msgpack.UnpackException) as exc:
            raise HandshakeError(f"the host's bootstrap is not msgpack: {exc}") from None
        if not isinstance(boot, dict):
            raise HandshakeError("the host sent no bootstrap with its WELCOME")
    except BaseException:
        conn.close()
        raise
    boot.update(name=remote["name"], module_path=remote["module_path"], share_torch=remote.get("share_torch", False),
                remote=remote, session="", endpoint=remote["endpoint"])
    return conn, boot


async def _watch_remote_host(conn: Any, timeout: float) -> None:
    """Exit when nothing came from the host for ``timeout`` seconds: it pings every
    ``heartbeat_interval``, so silence means a partition or a host that is gone."""
    last, since = conn.read_count(), asyncio.get_running_loop().time()
    step = max(0.05, min(timeout / 4, 1.0))
    while True:
        await asyncio.sleep(step)  # a poll of a counter, not a synchronisation
        now, count = asyncio.get_running_loop().time(), conn.read_count()
        if count != last:
            last, since = count, now
        elif now - since > timeout:
            sys.stderr.write(f"pyisolate worker: nothing from the host for {timeout:.1f} s (heartbeat_timeout); "
                             "leaving to rejoin\n")
            sys.stderr.flush()
            exits.exit_now(EXIT_HOST_GONE)


def _trace(loop: asyncio.AbstractEventLoop, send: Any, endpoint: Any) -> Any:
    """Trace this worker's calls, its spans shipped to the host; return what ships them (None:
    OpenTelemetry cannot be imported here, and the worker serves untraced)."""
    from .traces import install

    installed = install(loop, send)
    if installed is None:
        return None
    from pyisolate._rpc import make_tracing

    tracer, shipper = installed
    endpoint.tracing = tracing = make_tracing(tracer)
    tracing.on_served = shipper.ship
    return shipper.ship


def _app_types(reference: str, load_types: Any) -> Any:
    """The application's TypeRegistry, filled by its function (``ExtensionManagerConfig.types``);
    the folder its module is imported from is among the host paths, on ``sys.path`` already."""
    try:
        return load_types(reference)
    except Exception as exc:
        raise ImportError(
            f"cannot run the host's type registry {reference!r} (ExtensionManagerConfig.types) in this "
            f"worker: {type(exc).__name__}: {exc}. The worker imports it with its own venv and the host paths: "
            "make what that module imports available there (the extension's dependencies, share_torch), or "
            "import such packages only inside the function, where present") from exc


def _setup_output(level: int | str) -> None:
    """Send our log records and output to the host, which logs them under the extension's name.

    The worker process is ours, so configuring its root logger is fine: records go to stderr as
    ``logs.RecordHandler`` lines (the host re-logs them at their level), warnings become records,
    and stdout is line-buffered so that a print reaches the host when it happens, not at exit.
    """
    from .logs import RecordHandler

    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(level=level, handlers=[RecordHandler(sys.stderr)])
    logging.captureWarnings(True)


def _confine(boot: dict[str, Any]) -> None:
    """Apply the host's resource limits and sandbox rules to this process, for good.

    A rule that cannot be applied while the host requires it ends the worker before any
    extension code runs: the host reports the load as failed with this message.
    """
    import resource

    from .confine import ConfineError, apply

    try:
        for which, (soft, hard) in boot.get("rlimits", {}).items():
            resource.setrlimit(int(which), (int(soft), int(hard)))
        if boot.get("confine") is not None:
            apply(boot["confine"])
    except (ConfineError, OSError, ValueError) as exc:
        sys.stderr.write(f"pyisolate worker: cannot confine this worker as required: {exc}\n")
        sys.stderr.flush()
        os._exit(EXIT_CONFINE)


def main() -> None:
    """Entry point of the worker process."""
    from pyisolate._wire import shm

    channel = shm.WorkerChannel(int(sys.argv[1]))
    try:
        boot = channel.boot(timeout=_BOOT_TIMEOUT)
    except (OSError, RuntimeError, ValueError) as exc:
        sys.stderr.write(f"pyisolate worker: no bootstrap from the host: {exc}\n")
        os._exit(EXIT_HOST_GONE)
    _setup_output(boot.get("log_level", logging.WARNING))
    if boot.get("confine") is not None or boot.get("rlimits"):
        # Before any other thread (Landlock confines the calling thread and what it starts
        # later), before the runtime's imports and before any extension code.
        _confine(boot)
    from . import stacks

    stacks.install()  # the host may ask for every thread's stack, even while the loop is blocked
    threading.Thread(target=_watch_host, args=(sys.stdin.fileno(),), name="host-watch", daemon=True).start()
    sys.stdin = open(os.devnull)  # extension code must not consume the host-liveness pipe
    try:
        with asyncio.Runner() as runner:  # asyncio.run(), with a way out before its teardown
            try:
                code = runner.run(_serve(boot, channel))
            except SystemExit as exc:  # from a hook, the stop hook, a task the extension started
                exits.leave(exc)
    except Exception:
        traceback.print_exc()
        code = 1
    exits.exit_now(code)  # its descendants go with it, its output is flushed


if __name__ == "__main__":
    main()
