"""Measure the classic pyisolate 0.10.2 from PyPI (the project our API imitates) for side-by-side ratios.

    .venv/bin/python benchmarks/classic.py --work-dir /tmp/classic-bench [--quick]

``run_classic(work_dir)`` builds (once; a marker file says it is complete) a throwaway venv in
``work_dir/venv`` with ``python -m venv``, installs ``pyisolate==0.10.2``, ``torch==2.13.0`` and numpy
there with pip, then runs ``classic_ext/driver.py`` inside it as a subprocess and returns the
JSON object the driver prints on its last stdout line. The driver's stderr (classic's logs, uv,
the extension children) goes to ``work_dir/driver.log``.

Torch safety: an unpinned torch pulls a multi-GB CUDA build. Classic pyisolate needs no torch
(its requirements are uv and packaging), but its tensor sharing does, so every pip step runs with
a constraints file pinning ``torch==2.13.0`` (the CPU build in the local wheel store), and the
driver gets the same file as ``PIP_CONSTRAINT``/``UV_CONSTRAINT``. With ``share_torch=True`` and no
dependencies, classic's uv only creates the extension venv (``uv venv --seed``, pip comes from the
index) and links the host's site-packages into it with a .pth file; it never installs torch. The
driver gets its own ``UV_CACHE_DIR`` and run_classic checks that no torch ever landed in it.

Keys returned: host_ext_call, throughput_64, ext_singleton_call, bytes_1MiB, tensor_shared_1KiB,
tensor_shared_64MiB, tensor_shared_1GiB (not with quick), warm_start_s, version, notes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLASSIC = "pyisolate==0.10.2"
TORCH = "torch==2.13.0"
NUMPY = "numpy==2.4.6"  # as in our dev venv; without numpy classic retries `import numpy` on every tensor sent
HERE = Path(__file__).resolve().parent
MARKER = ".classic-ready"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _step(name: str, cmd: list[str], log: Callable[[str], object]) -> str:
    """Run one install step; raise RuntimeError naming it, with the output's tail, if it fails."""
    log(f"classic: {name}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"classic benchmark: step '{name}' failed: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"classic benchmark: step '{name}' failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
        )
    return proc.stdout


def _ensure_venv(work_dir: Path, constraints: Path, log: Callable[[str], object]) -> Path:
    """Return the throwaway venv's python, building the venv unless its marker says it is complete."""
    venv = work_dir / "venv"
    python = venv / "bin" / "python"
    wanted = f"{CLASSIC} {TORCH} {NUMPY}\n"
    marker = venv / MARKER
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    started = time.monotonic()
    shutil.rmtree(work_dir / "ext-venvs", ignore_errors=True)  # classic's extension venv links into this one
    _step("create venv", [sys.executable, "-m", "venv", "--clear", str(venv)], log)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    wheels = work_dir / "wheels"
    _step(f"download {CLASSIC}", [*pip, "download", "--no-deps", "-d", str(wheels), CLASSIC], log)
    wheel = next(wheels.glob("pyisolate-0.10.2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read("pyisolate-0.10.2.dist-info/METADATA").decode()
    needs = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    log(f"classic: {CLASSIC} requires {needs}; torch pinned by {constraints.name} either way")
    install = [*pip, "install", "-c", str(constraints), str(wheel), TORCH, NUMPY]
    _step(f"install {CLASSIC}, {TORCH}, {NUMPY}", install, log)
    marker.write_text(wanted)
    log(f"classic: venv built in {time.monotonic() - started:.0f} s")
    return python


def _wait_for_shm_release(pid: int, timeout: float = 10.0) -> None:
    """Give torch_shm_manager (it outlives the driver by a moment) time to unlink the driver's segments."""
    deadline = time.monotonic() + timeout
    while any(Path("/dev/shm").glob(f"torch_{pid}_*")) and time.monotonic() < deadline:
        time.sleep(0.1)


def run_classic(work_dir: Path, *, quick: bool = False, log: Callable[[str], object] = print) -> dict[str, Any]:
    """Build or reuse the classic venv under work_dir, run the driver there, return its figures.

    Raises:
        RuntimeError: a step failed; the message names it and ends with the output's tail.
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    constraints = work_dir / "constraints.txt"
    constraints.write_text(f"{TORCH}\n")
    python = _ensure_venv(work_dir, constraints, log)

    uv_cache = work_dir / "uv-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",  # classic looks up `uv` on PATH
        VIRTUAL_ENV=str(python.parent.parent),
        PIP_CONSTRAINT=str(constraints),
        UV_CONSTRAINT=str(constraints),
        UV_CACHE_DIR=str(uv_cache),
    )
    cmd = [str(python), "-m", "classic_ext.driver", "--venv-root", str(work_dir / "ext-venvs")]
    log_path = work_dir / "driver.log"
    log(f"classic: running the driver{' (quick)' if quick else ''}; its log: {log_path}")
    with open(log_path, "w") as err:
        # A session of its own, so whatever the driver leaves behind (extension children) can be killed.
        proc = subprocess.Popen(
            [*cmd, *(["--quick"] if quick else [])],
            cwd=HERE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"classic benchmark: step 'driver' timed out:\n{_tail(log_path.read_text())}") from exc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _wait_for_shm_release(proc.pid)
    if proc.returncode != 0 or not stdout.strip():
        raise RuntimeError(
            f"classic benchmark: step 'driver' failed (exit {proc.returncode}):\n{_tail(stdout + log_path.read_text())}"
        )
    try:
        results: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"classic benchmark: step 'parse driver output' failed: {exc}\n{_tail(stdout)}") from exc
    torch_in_cache = sorted({p.name for p in uv_cache.rglob("torch*")}) if uv_cache.exists() else []
    if torch_in_cache:
        raise RuntimeError(f"classic benchmark: step 'torch check' failed: uv fetched {torch_in_cache}")
    results["notes"].append("no torch was fetched by classic's uv (its cache holds none)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="holds the reusable classic venv")
    parser.add_argument("--quick", action="store_true", help="fewer samples, no 1 GiB tensor")
    args = parser.parse_args()
    results = run_classic(args.work_dir, quick=args.quick, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
