"""How a worker process ends: every way out kills its descendants, flushes its output, exits.

The ways out: the host asked it to stop; its extension failed to load; the host went away
(end-of-file on stdin, seen by the host-watch thread); SIGTERM; and ``SystemExit`` raised by
the extension's own code, from a method of any kind (coroutine, plain, async generator, a
callback), a hook, or a task of its own. Each ends in ``exit_now``: SIGKILL every
descendant (``workers.tree``; the worker is their subreaper, so daemons are found too) and
wait for them, flush stdout and stderr, ``os._exit``. No interpreter shutdown: nothing else
runs, and nothing else prints.

``SystemExit`` is honoured as Python would: the worker exits with its code (None: 0, an int:
its low byte, anything else: printed, then 1). The call that raised it gets no answer; the
host sees the worker exit and fails it, like every call still pending, with
``ExtensionCrashedError`` carrying that exit code. A ``RestartPolicy`` treats it as a crash.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from . import tree

__all__ = [
    "EXIT_CONFINE", "EXIT_HANDSHAKE", "EXIT_HOST_GONE", "EXIT_LOAD_FAILED", "EXIT_OK", "exit_code", "exit_now",
    "install", "leave",
]  # fmt: skip

#: How a worker ends on its own, for the host to tell the cases apart.
EXIT_OK = 0
EXIT_LOAD_FAILED = 3
EXIT_HANDSHAKE = 4
EXIT_HOST_GONE = 5
EXIT_CONFINE = 6  # the host required a confinement this worker could not apply

logger = logging.getLogger("pyisolate.workers")

#: How long a worker on its way out waits for its SIGKILLed descendants to be gone.
_DESCENDANTS_TIMEOUT = 5.0
#: What leave() runs first: closes the connection, letting what was already sent leave.
_close: Callable[[], None] | None = None


def install(close: Callable[[], None] | None = None) -> None:
    """Before any extension code runs: adopt orphaned descendants, end cleanly on SIGTERM.

    ``close`` is what ``leave`` runs before the process exits (the connection's flushing close).
    Call from the main thread.
    """
    global _close
    _close = close
    tree.become_subreaper()
    signal.signal(signal.SIGTERM, _on_sigterm)


def exit_now(code: int) -> NoReturn:
    """Kill every descendant of this process, flush its output and exit with ``code``."""
    try:
        _end_descendants()
        _flush()
    finally:
        os._exit(code)


def exit_code(exc: SystemExit) -> int:
    """The exit status Python gives ``SystemExit(code)``; a message that is not an int is printed."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF  # what the host will see: the low byte
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:
        pass
    return 1


def leave(exc: SystemExit) -> NoReturn:
    """Extension code raised ``exc``: say where, close the connection, exit with its code.

    Runs on the worker's main thread (the event loop's), never returns.
    """
    code = exit_code(exc)
    try:
        where = traceback.extract_tb(exc.__traceback__)[-1:]
        place = f" at {where[0].filename}:{where[0].lineno} in {where[0].name}()" if where else ""
        logger.warning("the extension raised SystemExit(%r)%s; the worker exits with code %d", exc.code, place, code)
        if _close is not None:
            _close()  # what was already sent still leaves; the call that raised gets no answer
    finally:
        exit_now(code)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM: take the descendants along, then die of SIGTERM as if there were no handler."""
    try:
        _end_descendants()
        _flush()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(128 + signal.SIGTERM)  # not reached: SIGTERM is delivered as kill() returns


def _end_descendants() -> None:
    pidfds = tree.kill_descendants(os.getpid())
    try:
        tree.wait_exited(pidfds, _DESCENDANTS_TIMEOUT)
    finally:
        tree.close_pidfds(pidfds)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the host may have closed its end
            pass
