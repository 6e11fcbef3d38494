"""The worker process: ``python -I -c <bootstrap> RUNTIME_DIR`` started by the host.

The host writes one JSON line on our stdin (name, broker endpoint, launch secret, module
path, extension class) and keeps the pipe open: end-of-file on stdin means the host is
gone, even if it was killed, and the worker exits at once. Nothing here imports host-only
code (manager, venv builder).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import traceback
from typing import Any

EXIT_OK = 0
EXIT_LOAD_FAILED = 3
EXIT_HANDSHAKE = 4
EXIT_HOST_GONE = 5

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
        os._exit(EXIT_HOST_GONE)


async def _serve(boot: dict[str, Any]) -> int:
    from pyisolate._codec import encode, encode_exception
    from pyisolate.broker.protocol import HOST, Kind, pack_header

    from .connection import Connection, HandshakeError
    from .loader import import_class, load_extension
    from .serve import Server, public_methods

    conn = Connection(boot["endpoint"])
    try:
        try:
            conn.handshake(boot["name"], bytes.fromhex(boot["secret"]), timeout=float(boot["handshake_timeout"]))
        except HandshakeError as exc:
            logger.error("%s", exc)
            return EXIT_HANDSHAKE
        try:
            from pyisolate._base import ExtensionBase

            base = import_class(boot["extension_class"]) if boot["extension_class"] else ExtensionBase
            instance = await load_extension(boot["module_path"], base)
        except Exception as exc:
            body, buffers = encode_exception(exc)
            conn.send([HOST, pack_header(Kind.LOAD_FAILED), body, *buffers])
            conn.close(flush=True)
            return EXIT_LOAD_FAILED
        loop = asyncio.get_running_loop()
        server = Server(instance, conn.send, loop)
        conn.start(loop, server.on_message)
        conn.send([HOST, pack_header(Kind.READY), encode({"methods": public_methods(instance)})[0]])
        await server.finished.wait()
        await server.drain()
        conn.close(flush=True)
        return EXIT_OK
    finally:
        conn.close()


def main() -> None:
    """Entry point of the worker process."""
    line = sys.stdin.buffer.readline()
    boot = json.loads(line)
    logging.basicConfig(  # the worker process is ours: configuring its root logger is fine
        level=boot.get("log_level", "WARNING"),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    threading.Thread(target=_watch_host, args=(sys.stdin.fileno(),), name="host-watch", daemon=True).start()
    sys.stdin = open(os.devnull)  # extension code must not consume the host-liveness pipe
    try:
        code = asyncio.run(_serve(boot))
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
