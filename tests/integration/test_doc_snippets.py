"""Every python snippet of the README, getting-started and the guides is checked, and the
complete programs among them run.

A snippet is a fenced ```python block (indented ones in list items too). What each kind must do:

- **Every snippet compiles** (top-level ``await`` allowed: the guides show host code as it
  reads inside ``async def main()``), after dedenting: a method shown alone compiles.
- **A file** is a snippet whose first line is ``# <path>.py`` and nothing else
  (``# extensions/stats/__init__.py``). A reader copies it into that file, so it must stand
  alone: every name it uses is a builtin or bound in it (its imports included).
- **A fragment** is any other snippet: an excerpt of a program. Every name it uses is bound in
  it, in an earlier snippet of the same page (the program as the reader has seen it so far),
  or in the page's runnable example (``examples/<feature>/``, named on the page as "Runnable
  example: ..."), whose whole program ``tests/integration/test_examples.py`` runs. So a fragment
  cannot use a name that exists nowhere a reader could find it. Names are collected without
  regard to scope (bound anywhere counts): this finds missing imports and misspelt names,
  not every mistake.
- **A complete program** is a file that calls ``asyncio.run(...)`` at module level (a
  ``# main.py``): the page's files are written into an empty folder, the program is run there
  with this interpreter (its extensions get real venvs under ``./venvs``, as the page says),
  and it must exit 0 and print. What the page says it prints, the test checks (``PROMISED``).

Tying each snippet to a line of an example file instead would break on every simplification a
guide makes for reading; these rules keep a snippet honest without forbidding that.
"""

from __future__ import annotations

import ast
import builtins
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "docs" / "getting-started.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
# Pages whose snippets are excerpts of an example the page does not name as its runnable one.
EXAMPLE_OF = {"tensors.md": "demo"}
# What a complete program of a page must print (on stdout or stderr), as the page says it does.
PROMISED = {
    "README.md": ["Mean: 3.0", "INFO:pyisolate.extension.data_processor:averaging 5 values"],
    "getting-started.md": ["2.5", "INFO:pyisolate.extension.stats:mean of 4 values"],
}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)
_FILE_HEADER = re.compile(r"#\s*(?P<path>[\w./-]+\.py)")
_RUNNABLE = re.compile(r"Runnable example: `examples/(?P<name>\w+)/`")
_MODULE_NAMES = {"__file__", "__name__"}


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    code: str

    @property
    def path(self) -> str | None:
        """The file this snippet is, if its first line says so."""
        first = self.code.splitlines()[0].strip() if self.code.strip() else ""
        match = _FILE_HEADER.fullmatch(first)
        return match["path"] if match else None

    @property
    def is_program(self) -> bool:
        """A file that runs something: it calls ``asyncio.run(...)`` at module level."""
        if self.path is None:
            return False
        try:
            body = ast.parse(self.code).body
        except SyntaxError:  # test_every_snippet_compiles_and_its_names_resolve says so
            return False
        calls = [node.value for node in body if isinstance(node, ast.Expr)]
        return any(isinstance(call, ast.Call) and ast.unparse(call.func) == "asyncio.run" for call in calls)

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    text = page.read_text()
    return [Snippet(page, text.count("\n", 0, m.start()) + 2, textwrap.dedent(m["body"]))
            for m in _FENCE.finditer(text)]


def _parse(snippet: Snippet) -> ast.Module:
    tree = compile(snippet.code, str(snippet), "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    assert isinstance(tree, ast.Module)
    return tree


def _names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(names bound anywhere in ``tree``, names read anywhere in it)."""
    bound: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound, used


def _example_names(page: Path) -> set[str]:
    """The names bound anywhere in the page's runnable example, every file of it."""
    found = _RUNNABLE.search(page.read_text())
    name = found["name"] if found else EXAMPLE_OF.get(page.name)
    if name is None:
        return set()
    folder = ROOT / "examples" / name
    assert (folder / "main.py").is_file(), f"{page.relative_to(ROOT)} names examples/{name}/, which has no main.py"
    bound: set[str] = set()
    for source in sorted(folder.rglob("*.py")):
        if "venvs" in source.relative_to(folder).parts:  # what running the example built: not its code
            continue
        bound |= _names(ast.parse(source.read_text(), str(source)))[0]
    return bound


def _unresolved(page: Path) -> list[str]:
    known = set(dir(builtins)) | _MODULE_NAMES
    from_example = _example_names(page)
    seen: set[str] = set()  # bound by the page's snippets so far
    problems = []
    for snippet in snippets(page):
        bound, used = _names(_parse(snippet))
        context = bound if snippet.path else bound | seen | from_example
        missing = sorted(used - known - context)
        if missing:
            kind = f"file {snippet.path}" if snippet.path else "fragment"
            problems.append(f"{snippet} ({kind}) uses {', '.join(missing)}, bound nowhere "
                            f"{'in it' if snippet.path else 'in it, above it or in its example'}")
        seen |= bound
    return problems


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_pages_have_snippets() -> None:
    counts = {page.name: len(snippets(page)) for page in PAGES}
    assert counts["getting-started.md"] >= 3 and counts["README.md"] >= 3, counts
    # Indented fences (in list items) are found too.
    assert any("async def host_step" in s.code for s in snippets(ROOT / "docs" / "guides" / "context.md"))


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_snippet_compiles_and_its_names_resolve(page: Path) -> None:
    for snippet in snippets(page):
        try:
            _parse(snippet)
        except SyntaxError as exc:
            pytest.fail(f"{snippet} does not compile: {exc}\n{snippet.code}")
    problems = _unresolved(page)
    assert not problems, "\n".join(problems)


PROGRAMS = [s for page in PAGES for s in snippets(page) if s.is_program]


def test_the_promised_output_belongs_to_programs() -> None:
    assert {s.page.name for s in PROGRAMS} == set(PROMISED)


@pytest.mark.venv
@pytest.mark.timeout(660)
@pytest.mark.parametrize("program", PROGRAMS, ids=str)
def test_complete_programs_run(program: Snippet, tmp_path: Path) -> None:
    for snippet in snippets(program.page):
        if snippet.path:
            target = tmp_path / snippet.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(snippet.code)
    done = subprocess.run([sys.executable, str(program.path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{program} exited with {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{program} printed nothing; stderr:\n{done.stderr}"
    output = done.stdout + done.stderr
    for promise in PROMISED[program.page.name]:
        assert promise in output, f"{program} did not print {promise!r}:\n{output}"
