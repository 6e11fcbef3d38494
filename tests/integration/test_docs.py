"""The documentation site builds in strict mode, quietly, API reference included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _nav_pages() -> list[str]:
    """Every page that mkdocs.yml's nav names (``Title: path.md`` entries)."""
    return re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.MULTILINE)


# What every build says; anything else (a warning, a notice such as mkdocstrings-python's "Formatting
# signatures requires either Black or Ruff") is something to fix.
ROUTINE = ("Cleaning site directory", "Building documentation to directory", "Documentation built in")


def test_docs_site_builds_in_strict_mode_with_the_api_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner, not a build warning

    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert [line for line in said if not any(routine in line for routine in ROUTINE)] == [], result.stderr
    pages = _nav_pages()
    assert {"index.md", "api.md", "guides/testing.md", "protocol.md", "guarantees.md"} <= set(pages)
    for page in pages:  # each nav entry became a page (use_directory_urls: foo.md -> foo/index.html)
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"{page} was not built"
    api = (site / "api" / "index.html").read_text()
    # Docstring text, rendered from the sources by mkdocstrings.
    assert "Load extensions into their own venvs and processes, and stop them." in api
    assert "Settings shared by every extension of one manager." in api
    assert "The public exception tree of pyisolate." in api
    import pyisolate

    undocumented = [
        name for name in pyisolate.__all__
        if f'id="pyisolate.{name}"' not in api and f'id="pyisolate.errors.{name}"' not in api
    ]
    assert undocumented == [], "add these public names to docs/api.md"
