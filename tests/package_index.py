"""Package sources for tests, with no network: tiny real wheels, and a PEP 503 index on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import html
import http.server
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from packaging.utils import canonicalize_name, parse_wheel_filename


def write_wheel(
    folder: Path, name: str, version: str, *, requires: Sequence[str] = (), tag: str = "py3-none-any"
) -> Path:
    """Write a valid wheel of distribution ``name``: one module (``name`` with ``_``) whose
    ``VERSION`` is ``version``, its METADATA (with ``requires`` as Requires-Dist), WHEEL and RECORD."""
    folder.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files = {
        f"{module}.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": metadata,
        f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    path = folder / f"{dist}-{tag}.whl"
    record = []
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            data = text.encode()
            archive.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(data)}")
        record.append(f"{dist}.dist-info/RECORD,,")
        archive.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def publish(root: Path, wheels: Sequence[Path]) -> None:
    """Lay out a PEP 503 index under ``root``: ``<name>/index.html`` pages linking (with their
    sha256) to the wheels, copied into ``root/../files``."""
    files = root.parent / "files"
    files.mkdir(parents=True, exist_ok=True)
    pages: dict[str, list[str]] = {}
    for wheel in wheels:
        (files / wheel.name).write_bytes(wheel.read_bytes())
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        href = html.escape(f"../../files/{wheel.name}#sha256={digest}")
        pages.setdefault(name, []).append(f'<a href="{href}">{html.escape(wheel.name)}</a><br>')
    root.mkdir(parents=True, exist_ok=True)
    for name, anchors in pages.items():
        (root / name).mkdir(exist_ok=True)
        body = "\n".join(anchors)
        (root / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{body}\n</body></html>\n")


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.server.authorization and self.headers.get("Authorization") != self.server.authorization:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="index"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's name)
        with self.server.lock:
            self.server.requests.append(self.path)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path, authorization: str | None) -> None:
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.authorization = authorization
        super().__init__(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(directory)))


class LocalIndex:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) until closed; a context manager.

    ``url`` is the server's root (``http://127.0.0.1:<port>``); ``requests`` the paths asked for.
    With ``credentials`` (user, password), every request needs them (HTTP Basic), and
    ``url`` carries them.
    """

    def __init__(self, directory: Path, *, credentials: tuple[str, str] | None = None) -> None:
        token = None if credentials is None else base64.b64encode(":".join(credentials).encode()).decode()
        self._server = _Server(directory, None if token is None else f"Basic {token}")
        host, port = self._server.server_address[:2]
        login = "" if credentials is None else f"{credentials[0]}:{credentials[1]}@"
        self.url = f"http://{login}{host!s}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-index", daemon=True)
        self._thread.start()

    @property
    def requests(self) -> list[str]:
        with self._server.lock:
            return list(self._server.requests)

    def close(self) -> None:
        self._server.shutdown()  # returns once serve_forever has stopped
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> LocalIndex:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
