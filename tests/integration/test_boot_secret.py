"""D13: a sibling extension cannot learn another worker's launch secret or join under its name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyisolate._host.worker import describe_exit

ROOT = Path(__file__).resolve().parents[2]


def _unprivileged() -> list[str]:
    """A command prefix that runs the host without privileges over other processes, or skip."""
    with open("/proc/self/status") as f:
        effective = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    if effective == 0:
        return []  # a plain user already: the kernel's checks apply as they stand
    if shutil.which("setpriv") is None:
        pytest.skip("the test runs with privileges and setpriv is missing to drop them")
    # Root without any capability: the same checks on /proc and ptrace as for any user.
    return ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"]


def test_a_sibling_cannot_learn_a_launch_secret_or_join_under_another_name(venv_root: Path) -> None:
    proc = subprocess.run([*_unprivileged(), sys.executable, str(ROOT / "tests" / "boot_host.py"), str(venv_root)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"the host {describe_exit(proc.returncode)}:\n{proc.stderr[-3000:]}"
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["victim_pid"] in found["pids"]  # the spy saw the victim start
    # /proc/<victim>/fd/0, every fd, environ, cmdline, mem, pidfd_getfd, the pipes the host holds:
    tried = found["outcomes"]
    assert {"fd/0", "fd/*", "environ", "cmdline", "mem", "pidfd_getfd", "host fd"} <= set(tried), tried
    assert found["learned"] is False, found
    assert all(outcome != "joined" for outcome in found["joins"]), found["joins"]
    assert found["victim_dumpable"] == 0 and found["snoop_dumpable"] == 0  # workers are non-dumpable
