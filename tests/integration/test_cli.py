"""The pyisolate command line, run for real: ``python -m pyisolate ...`` in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyisolate

pytestmark = pytest.mark.venv

MARKER = ".pyisolate-ready.json"
USED = ".pyisolate-used"


def cli(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pyisolate ARGS`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "pyisolate", *map(str, args)], capture_output=True, text=True,
        timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def cli_json(*args: str | Path, expect: int | None = 0, **kwargs: object) -> dict:
    """Run with ``--json``; check the exit code (any, with ``expect=None``) and parse stdout."""
    done = cli(*args, "--json", **kwargs)  # type: ignore[arg-type]
    assert expect is None or done.returncode == expect, done.stdout + done.stderr
    return json.loads(done.stdout)


def _extension(root: Path, name: str, manifest: str | None = None) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "__init__.py").write_text("")
    if manifest is not None:
        (directory / "pyproject.toml").write_text(manifest)
    return directory


@pytest.fixture
def extensions(tmp_path: Path) -> Path:
    root = tmp_path / "extensions"
    _extension(root, "cli_alpha")
    _extension(root, "beta_dir", '[project]\nname = "cli-beta"\n[tool.pyisolate]\nenv = { X = "1" }\n')
    return root


@pytest.mark.parametrize(
    "command", [[], ["doctor"], ["env"], ["env", "list"], ["env", "build"], ["env", "repair"], ["env", "prune"],
                ["bench"]],
)
def test_every_level_has_help(command: list[str]) -> None:
    done = cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: pyisolate {' '.join(command)}".rstrip())
    assert len(done.stdout.splitlines()) > 4  # a description and options, not a bare usage line


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        ([], "usage: pyisolate"),
        (["env"], "usage: pyisolate env"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["env", "prune"], "say which venvs to remove"),
        (["env", "prune", "--older-than", "-1"], "give a number of days >= 0"),
        (["env", "build", "/no/such/extension"], "/no/such/extension: no such file or directory"),
    ],
)
def test_usage_errors_exit_2_and_say_why(command: list[str], needle: str, tmp_path: Path) -> None:
    done = cli(*command, cwd=tmp_path)
    assert done.returncode == 2
    assert needle in done.stderr


@pytest.mark.parametrize(
    ("command", "given_to"),
    [
        (["env", "repair", "one", "two"], "env repair"),
        (["env", "repair", "one", "--bogus"], "env repair"),
        (["env", "list", "extra"], "env list"),
        (["doctor", "--bogus"], "doctor"),
        (["--bogus", "doctor"], ""),  # a top-level option, before the command
    ],
)
def test_a_wrong_argument_shows_the_usage_of_the_command_it_was_given_to(command: list[str], given_to: str,
                                                                         tmp_path: Path) -> None:
    done = cli(*command, cwd=tmp_path)
    assert done.returncode == 2
    prog = f"pyisolate {given_to}".rstrip()
    assert done.stderr.startswith(f"usage: {prog} [-h]"), done.stderr
    assert f"{prog}: error: unrecognized arguments: {command[-1] if given_to else command[0]}" in done.stderr


@pytest.mark.parametrize("command", [["list"], ["build", "."], ["repair", "x"], ["prune", "--older-than", "1"]])
def test_env_commands_refuse_a_venv_root_that_is_not_a_directory(command: list[str], tmp_path: Path) -> None:
    a_file = tmp_path / "venvs"
    a_file.write_text("not a directory")
    for root, said in ((a_file, f"venv root {a_file}: not a directory"),
                       (a_file / "below", f"not a directory ({a_file} is not one)")):
        done = cli("env", *command, "--venv-root", root, cwd=tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert said in done.stderr and done.stdout == ""
    assert a_file.read_text() == "not a directory"


def test_doctor_reports_a_venv_root_it_cannot_create(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    # /proc: the directory is there and, for root, "writable", yet nothing can be created in it.
    for root, said in ((Path("/proc/pyisolate-venvs"), "cannot be created: making a directory in /proc fails"),
                       (a_file / "venvs", f"{a_file} is not a directory")):
        done = cli("doctor", "--venv-root", root)
        assert done.returncode == 1, done.stdout
        line = next(line for line in done.stdout.splitlines() if line.startswith("error  venv_root"))
        assert said in line and "no problems found" not in done.stdout
        assert "fix: pass --venv-root DIR" in done.stdout
        report = cli_json("doctor", "--venv-root", root, expect=1)
        assert report["ok"] is False
        assert next(c for c in report["checks"] if c["name"] == "venv_root")["status"] == "error"
    writable = cli_json("doctor", "--venv-root", tmp_path / "new" / "venvs", expect=None)
    check = next(c for c in writable["checks"] if c["name"] == "venv_root")
    assert check["status"] in ("ok", "warn") and "will be created" in check["summary"]
    assert not (tmp_path / "new").exists()  # the probe left nothing behind


def test_doctor_json_reports_each_check_with_its_fix() -> None:
    done = cli("doctor", "--json")
    report = json.loads(done.stdout)
    assert [c["name"] for c in report["checks"]] == ["python", "uv", "ipc", "shm", "sandbox", "limits", "torch",
                                                     "cuda", "venv_root"]
    assert done.returncode == (0 if report["ok"] else 1)
    for check in report["checks"]:
        assert check["status"] in ("ok", "info", "warn", "error")
        assert check["fix"] or check["status"] in ("ok", "info"), check
    uv = next(c for c in report["checks"] if c["name"] == "uv")
    assert uv["status"] == "ok" and "uv " in uv["summary"]
    cuda = next(c for c in report["checks"] if c["name"] == "cuda")
    if cuda["status"] == "info":
        assert cuda["summary"].startswith("not available")


def test_doctor_finds_a_socket_path_too_long_and_exits_1(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    done = cli("doctor", env={"TMPDIR": str(deep)})
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if line.startswith("error  ipc"))
    assert "over the 107 a unix socket allows" in line
    assert "fix: point TMPDIR at a writable directory with a short path" in done.stdout


def test_build_list_repair_prune(tmp_path: Path, extensions: Path) -> None:
    root = tmp_path / "venvs"
    dirs = [extensions / "cli_alpha", extensions / "beta_dir"]
    built = cli_json("env", "build", *dirs, "--venv-root", root)
    assert [(e["name"], e["status"]) for e in built["extensions"]] == [("cli_alpha", "built"), ("cli-beta", "built")]
    assert (root / "cli_alpha" / "bin" / "python").exists()
    again = cli_json("env", "build", *dirs, "--venv-root", root)
    assert [e["status"] for e in again["extensions"]] == ["reused", "reused"]

    # "last used" is when a host (or env build) last reused the venv.
    old = time.time() - 10 * 86400
    os.utime(root / "cli_alpha" / USED, (old, old))
    listed = cli_json("env", "list", "--venv-root", root)["venvs"]
    assert [(v["name"], v["status"], v["dependencies"]) for v in listed] == [
        ("cli-beta", "ready", []), ("cli_alpha", "ready", [])]
    assert all(v["size_bytes"] > 0 for v in listed)
    alpha_used = listed[1]["last_used"]
    cli_json("env", "build", extensions / "cli_alpha", "--venv-root", root)
    assert cli_json("env", "list", "--venv-root", root)["venvs"][1]["last_used"] > alpha_used

    # repair rebuilds from scratch, by name or by directory.
    (root / "cli_alpha" / "junk").write_text("left by hand")
    repaired = cli_json("env", "repair", "cli_alpha", "--venv-root", root)
    assert repaired["extensions"][0]["status"] == "built" and not (root / "cli_alpha" / "junk").exists()
    by_dir = cli_json("env", "repair", extensions / "beta_dir", "--venv-root", root)
    assert by_dir["extensions"][0]["name"] == "cli-beta"
    missing = cli("env", "repair", "nothing_here", "--venv-root", root)
    assert missing.returncode == 2 and "neither a venv" in missing.stderr

    # prune: --keep protects, --older-than narrows, --dry-run removes nothing.
    dry = cli_json("env", "prune", "--keep", extensions / "cli_alpha", "--dry-run", "--venv-root", root)
    assert [r["name"] for r in dry["removed"]] == ["cli-beta"] and (root / "cli-beta").is_dir()
    recent = cli_json("env", "prune", "--older-than", "5", "--venv-root", root)
    assert recent["removed"] == [] and {k["name"] for k in recent["kept"]} == {"cli_alpha", "cli-beta"}
    pruned = cli_json("env", "prune", "--keep", extensions, "--venv-root", root)  # a directory of extensions
    assert pruned["removed"] == []
    pruned = cli_json("env", "prune", "--keep", extensions / "cli_alpha", "--venv-root", root)
    assert [r["name"] for r in pruned["removed"]] == ["cli-beta"] and pruned["freed_bytes"] > 0
    assert not (root / "cli-beta").exists() and (root / "cli_alpha").is_dir()
    text = cli("env", "list", "--venv-root", root)
    assert text.returncode == 0 and "cli_alpha" in text.stdout and "cli-beta" not in text.stdout


def test_prune_never_leaves_the_root_nor_touches_a_venv_in_use(tmp_path: Path, extensions: Path) -> None:
    root = tmp_path / "venvs"
    cli_json("env", "build", extensions / "cli_alpha", extensions / "beta_dir", "--venv-root", root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / MARKER).write_text("{}")  # looks like a venv, but lives outside the root
    (outside / "precious").write_text("keep me")
    (root / "linked").symlink_to(outside)
    (root / "cli_alpha" / "link-out").symlink_to(outside)

    refused = cli("env", "prune", "--older-than", "0", "--venv-root", extensions)
    assert refused.returncode == 2 and "does not look like a pyisolate venv root" in refused.stderr

    python = root / "cli-beta" / "bin" / "python"
    with subprocess.Popen([python, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as running:
        try:  # Popen returns once the child has exec'd: its command line names the venv
            report = cli_json("env", "prune", "--older-than", "0", "--venv-root", root, expect=1)
        finally:
            running.stdin.close()  # type: ignore[union-attr]
            running.wait(timeout=30)
    assert [r["name"] for r in report["removed"]] == ["cli_alpha"]
    assert report["skipped"][0]["name"] == "cli-beta" and f"pid {running.pid}" in report["skipped"][0]["reason"]
    assert (outside / "precious").read_text() == "keep me" and (root / "linked").is_symlink()
    assert not (root / "cli_alpha").exists() and (root / "cli-beta").is_dir()


def test_a_bad_manifest_fails_the_build_with_file_field_and_fix(tmp_path: Path, extensions: Path) -> None:
    bad = _extension(extensions, "broken_manifest", '[tool.pyisolate]\npass_env = "HOME"\n')
    report = cli_json("env", "build", bad, extensions / "cli_alpha", "--venv-root", tmp_path / "v", expect=1)
    failed, good = report["extensions"]
    assert failed["status"] == "failed" and good["status"] == "built"  # the others still build
    assert str(bad / "pyproject.toml") in failed["error"] and "[tool.pyisolate].pass_env" in failed["error"]
    assert 'pass_env = ["HF_HOME"]' in failed["error"]


def test_a_failed_build_names_the_extension_when_its_manifest_says(tmp_path: Path, extensions: Path) -> None:
    _extension(extensions, "named_dir", '[project]\nname = "Named Ext"\ndependencies = 3\n')
    _extension(extensions, "by_folder", '[tool.pyisolate]\nrestart = "often"\n')
    _extension(extensions, "unreadable", "[project\n")
    dirs = [extensions / d for d in ("named_dir", "by_folder", "unreadable")]
    report = cli_json("env", "build", *dirs, "--venv-root", tmp_path / "v", expect=1)
    assert [(e["name"], e["status"]) for e in report["extensions"]] == [
        ("Named-Ext", "failed"), ("by_folder", "failed"), (None, "failed")]  # as from_path() would name them
    text = cli("env", "build", *dirs, "--venv-root", tmp_path / "v")
    assert text.returncode == 1
    assert [line.split()[:2] for line in text.stdout.splitlines() if line.startswith("failed")] == [
        ["failed", "Named-Ext"], ["failed", "by_folder"], ["failed", "?"]]


def test_prune_lists_every_bad_manifest_and_removes_nothing(tmp_path: Path, extensions: Path) -> None:
    root = tmp_path / "venvs"
    (root / ".locks").mkdir(parents=True)  # a venv root, as a host leaves it
    bad = [_extension(extensions, "bad_one", '[tool.pyisolate]\npass_env = "HOME"\n'),
           _extension(extensions, "bad_two", "[project\n")]
    done = cli("env", "prune", "--keep", extensions, "--venv-root", root)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "leave them out of --keep" in done.stderr
    for directory in bad:
        assert str(directory / "pyproject.toml") in done.stderr
    assert "[tool.pyisolate].pass_env" in done.stderr and "not valid TOML" in done.stderr
    assert done.stdout == "" and (root / ".locks").is_dir()


def test_bench_runs_the_suite_of_the_checkout() -> None:
    done = cli("bench", "--", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: run.py" in done.stdout


def test_bench_without_the_source_checkout_exits_2(tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(Path(pyisolate.__file__).parent, site / "pyisolate",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = cli("bench", "--quick", cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert done.returncode == 2
    assert "ships with the source repository" in done.stderr
