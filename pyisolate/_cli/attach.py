"""Find running hosts that serve the admin endpoint, and ask them one thing each.

A host with ``ExtensionManagerConfig(admin=True)`` (or ``PYISOLATE_ADMIN=1``) listens on
``$TMPDIR/pyisolate-<pid>-<random>/admin`` (see ``pyisolate._host.admin``); only its own user
can list that directory or connect.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any

from .._host import MAX_ANSWER, SOCKET_NAME, read_frame, write_frame

__all__ = ["AttachError", "HostEndpoint", "ask", "find_host", "hosts"]

#: How long one request may take (a worker's stack dump takes up to a few seconds).
TIMEOUT = 15.0

_HOW = ("start the host with ExtensionManagerConfig(admin=True), or with the environment variable "
        "PYISOLATE_ADMIN=1, and run this command as the host's user")


class AttachError(Exception):
    """No host to attach to, or the host refused or failed the request: the message says which."""


@dataclass(frozen=True)
class HostEndpoint:
    """A running host's admin socket."""
    pid: int
    path: str


def hosts() -> list[HostEndpoint]:
    """The hosts of this user with an admin endpoint, by pid (dead hosts' leftovers skipped)."""
    root = tempfile.gettempdir()
    found = []
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    for entry in entries:
        parts = entry.split("-")
        if len(parts) != 3 or parts[0] != "pyisolate" or not parts[1].isdigit():
            continue
        path = os.path.join(root, entry, SOCKET_NAME)
        try:
            if not os.path.exists(path):  # another user's directory, or a host without the endpoint
                continue
            os.kill(int(parts[1]), 0)
        except (ProcessLookupError, PermissionError):
            continue
        found.append(HostEndpoint(int(parts[1]), path))
    return sorted(found, key=lambda host: host.pid)


def find_host(which: int | str | None) -> HostEndpoint:
    """The one host to attach to: by pid, by the path of its admin socket, or the only one running.

    A process may run several managers with the endpoint: its pid alone then names none of
    them, and the path (``manager.admin_path``) picks one.

    Raises:
        AttachError: none, not that one, or several (name one with --host PID or --host PATH).
    """
    running = hosts()
    if isinstance(which, str) and not which.isdigit():
        path = os.path.abspath(which)
        for host in running:
            if os.path.abspath(host.path) == path:
                return host
        raise AttachError(f"no running host serves an admin endpoint at {which}; {_HOW}")
    if which is not None:
        pid = int(which)
        mine = [host for host in running if host.pid == pid]
        if len(mine) == 1:
            return mine[0]
        if mine:
            raise AttachError(f"host {pid} runs {len(mine)} managers with an admin endpoint ("
                              f"{', '.join(h.path for h in mine)}): choose one with --host PATH "
                              "(its manager.admin_path)")
        raise AttachError(f"no host with pid {pid} serves an admin endpoint here ({tempfile.gettempdir()}); {_HOW}")
    if not running:
        raise AttachError(f"no running pyisolate host with an admin endpoint found in {tempfile.gettempdir()}; "
                          f"{_HOW}")
    if len(running) > 1:
        raise AttachError(f"{len(running)} admin endpoints are served ("
                          f"{', '.join(f'pid {h.pid}: {h.path}' for h in running)}): choose one with --host PID "
                          "or --host PATH")
    return running[0]


def ask(host: HostEndpoint, request: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send ``request`` to ``host``'s admin endpoint and return its answer.

    Raises:
        AttachError: it could not be reached, refused, or answered with an error.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(host.path)
            write_frame(conn, request)
            answer = read_frame(conn, MAX_ANSWER)
        except PermissionError:
            raise AttachError(f"not allowed to attach to host {host.pid}: only its own user may") from None
        except (OSError, ValueError) as exc:
            raise AttachError(f"host {host.pid} did not answer ({exc})") from None
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        why = answer.get("error") if isinstance(answer, dict) else None
        raise AttachError(f"host {host.pid}: {why or 'malformed answer'}")
    return answer
