"""Stack dumps of a worker on a signal, readable even when its event loop is blocked.

At boot the worker registers ``faulthandler`` for ``STACK_SIGNAL``: the dump of every thread's
Python stack is written to stderr by a C signal handler, so it comes even while the loop is
stuck in a busy method or a thread holds the GIL in C code. ``chain=True`` then runs the
Python-level handler installed before it, which writes ``END`` once the interpreter gets to
run Python code in the main thread (at once for a loop that waits or a pure-Python busy loop):
the host's reader (``pyisolate._host.process``) takes the lines between its signal and ``END``
as the dump. Where the main thread never runs Python again, no ``END`` comes and the host
stops reading after its timeout, with the dump it has.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import sys
from types import FrameType

__all__ = ["END", "STACK_SIGNAL", "install", "is_dump_line"]

#: The signal that asks a worker for its stacks.
STACK_SIGNAL = signal.SIGUSR2
#: The line that ends a dump (written by the Python-level handler, after faulthandler's).
END = "pyisolate: end of stacks"

#: The lines faulthandler writes: a thread's heading, a frame, a truncation, or a blank line.
_DUMP_LINE = re.compile(
    r"(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):"
    r"|Stack \(most recent call first\):"
    r"|  File \".*\", line \d+ in .*"
    r"|  (?:<no Python frame>|\.\.\.)"
    r"|"
)


def is_dump_line(line: str) -> bool:
    """Whether ``line`` is one faulthandler writes in a stack dump."""
    return _DUMP_LINE.fullmatch(line) is not None


def _end(signum: int, frame: FrameType | None) -> None:
    os.write(2, f"{END}\n".encode())


def install() -> None:
    """Dump every thread's stack to stderr on ``STACK_SIGNAL``, then ``END`` (see above)."""
    signal.signal(STACK_SIGNAL, _end)  # first: faulthandler chains to it
    faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=True)
