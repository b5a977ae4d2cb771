"""The docs run as written: every code block is a tested file or visibly a fragment.

The convention (CONTRIBUTING.md, "Docs"), checked here:

- A ``python`` block in docs/ is either an include of a tested file (its
  body is only ``--8<-- "docs/snippets/NAME.py"`` or ``"...py:section"``,
  and its ``title`` names the file) or a fragment, whose first line is
  ``# fragment: <what it leaves out>`` and which must still compile.
- README.md is rendered where includes are not (GitHub, PyPI): its python
  blocks are fragments, or verbatim copies of a docs/snippets file named in
  an HTML comment just above the block.
- ``console`` blocks are shell commands, not run here (they install
  packages, start servers, run for minutes); every ``make`` target and every
  repository path they name must exist. ``text`` blocks are program output;
  ``toml`` blocks must parse. No other languages, no unlabelled blocks.
- No line of any block, included files' shown lines too, is over 80 characters.
- Every file under docs/snippets/ is shown somewhere, asserts what the page
  claims, says how to run it (``Run it: `python NAME.py` ``, from
  docs/snippets), and is run here that way; web snippets serve requests
  through a test client or by calling the ASGI/WSGI app.
- docs/api.md renders every public name from its docstring.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import perrequest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"
PAGES = sorted(DOCS.rglob("*.md"))
README = ROOT / "README.md"
MAX_COLUMNS = 80
LANGUAGES = {"python", "console", "text", "toml"}
INCLUDE_FROM = (SNIPPETS, ROOT / "examples")  # files the test suite runs

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_INCLUDE = re.compile(r'^-{1,}8<-{1,} "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"$')
_MARKER = re.compile(r"-{1,}8<-{1,} \[(?P<kind>start|end):(?P<name>[\w-]+)\]")
_ATTR = re.compile(r'(\w+)="([^"]*)"')
_RUN = re.compile(r"Run it: `(?P<command>(?:python|pytest) [^`]+)`")
_REPO_PATH = re.compile(r"(?<![\w/.-])((?:examples|docs|benchmarks|tests|src)/[\w./-]*\w)")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    attrs: dict[str, str]
    body: list[str]
    before: str  # the non-blank line above the fence

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        start, body = i, []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and set(lines[i].strip()) == {fence[0]}
        ):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        above = next((text for text in reversed(lines[:start]) if text.strip()), "")
        language = info.split()[0] if info else ""
        blocks.append(Block(path, start + 1, language, dict(_ATTR.findall(info)), body, above))
    return blocks


DOC_BLOCKS = [block for page in PAGES for block in _blocks(page)]
README_BLOCKS = _blocks(README)
ALL_BLOCKS = DOC_BLOCKS + README_BLOCKS


def _ids(blocks: list[Block]) -> list[str]:
    return [str(block) for block in blocks]


def _includes(block: Block) -> list[re.Match[str]]:
    """The include lines of a block, or [] when it is not (only) an include."""
    lines = [line for line in block.body if line.strip()]
    found = [_INCLUDE.match(line.strip()) for line in lines]
    return [m for m in found if m] if lines and all(found) else []


def _section(path: Path, name: str | None) -> list[str]:
    """The lines an include shows: the whole file or one section, markers removed."""
    lines = path.read_text().splitlines()
    if name is None:
        return [line for line in lines if not _MARKER.search(line)]
    shown, inside, found = [], False, False
    for line in lines:
        marker = _MARKER.search(line)
        if marker and marker["name"] == name:
            found = found or marker["kind"] == "start"
            inside = marker["kind"] == "start"
            if not inside:
                break
        elif marker:
            continue
        elif inside:
            shown.append(line)
    assert found, f"{path.relative_to(ROOT)} has no section {name!r}"
    return textwrap.dedent("\n".join(shown)).splitlines()


def _shown(block: Block) -> list[str]:
    """What the reader sees: includes expanded."""
    includes = _includes(block)
    if not includes:
        return block.body
    return [line for m in includes for line in _section(ROOT / m["path"], m["section"])]


def _is_fragment(block: Block) -> bool:
    first = block.body[0] if block.body else ""
    return bool(re.match(r"# fragment: \S", first))


# -- every block follows the convention -----------------------------------------------------


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=_ids(ALL_BLOCKS))
def test_block_has_a_known_language(block: Block) -> None:
    assert block.language in LANGUAGES, (
        f"{block}: a code block needs one of the languages {sorted(LANGUAGES)} "
        f"(shell commands: console), not {block.language!r}"
    )


PYTHON_DOC_BLOCKS = [block for block in DOC_BLOCKS if block.language == "python"]


@pytest.mark.parametrize("block", PYTHON_DOC_BLOCKS, ids=_ids(PYTHON_DOC_BLOCKS))
def test_python_block_is_an_include_of_a_tested_file_or_a_fragment(block: Block) -> None:
    includes = _includes(block)
    if not includes:
        assert _is_fragment(block), (
            f"{block}: a python block either includes a tested file "
            '(--8<-- "docs/snippets/NAME.py") or starts with "# fragment: <what it leaves out>"'
        )
        return
    for m in includes:
        path = (ROOT / m["path"]).resolve()
        assert path.is_file(), f"{block}: {m['path']} does not exist"
        assert any(path.is_relative_to(base) for base in INCLUDE_FROM), (
            f"{block}: {m['path']} is not under docs/snippets/ or examples/, "
            "whose files the tests run"
        )
    titles = {m["path"] for m in includes}
    assert block.attrs.get("title") in titles, (
        f'{block}: an include shows its file\'s name: title="{includes[0]["path"]}"'
    )


FRAGMENTS = [block for block in ALL_BLOCKS if block.language == "python" and _is_fragment(block)]


@pytest.mark.parametrize("block", FRAGMENTS, ids=_ids(FRAGMENTS))
def test_fragment_compiles(block: Block) -> None:
    source = "\n".join(block.body)
    compile(source, str(block), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


README_PYTHON = [block for block in README_BLOCKS if block.language == "python"]


@pytest.mark.parametrize("block", README_PYTHON, ids=_ids(README_PYTHON))
def test_readme_python_block_is_a_fragment_or_a_copy_of_a_snippet(block: Block) -> None:
    if _is_fragment(block):
        return
    m = re.fullmatch(r"<!-- (docs/snippets/\w+\.py)[^>]*-->", block.before.strip())
    assert m, (
        f"{block}: GitHub does not include files, so a complete program in README.md "
        "is a copy of a docs/snippets file named just above it: <!-- docs/snippets/NAME.py -->"
    )
    snippet = ROOT / m[1]
    assert snippet.is_file(), f"{block}: {m[1]} does not exist"
    assert block.body == snippet.read_text().splitlines(), (
        f"{block} differs from {m[1]}: copy the file into README.md again"
    )


CONSOLE = [block for block in ALL_BLOCKS if block.language == "console"]
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("block", CONSOLE, ids=_ids(CONSOLE))
def test_console_block_names_real_make_targets_and_paths(block: Block) -> None:
    text = "\n".join(line.split("#")[0] for line in block.body)
    for target in re.findall(r"\bmake (?:[A-Z]+=\S+ )*([\w-]+)", text):
        assert target in MAKE_TARGETS, f"{block}: the Makefile has no target {target!r}"
    for path in _REPO_PATH.findall(text):
        assert (ROOT / path).exists(), f"{block}: {path} does not exist"


TOML = [block for block in ALL_BLOCKS if block.language == "toml"]


@pytest.mark.parametrize("block", TOML, ids=_ids(TOML))
def test_toml_block_parses(block: Block) -> None:
    tomllib.loads("\n".join(block.body))


def test_no_code_line_is_over_80_characters() -> None:
    long = [
        f"{block}: {len(line)} characters: {line.strip()[:60]}..."
        for block in ALL_BLOCKS
        for line in _shown(block)
        if len(line) > MAX_COLUMNS
    ]
    assert not long, "code lines over 80 characters hide behind a scroll bar:\n" + "\n".join(long)


def test_the_block_parser_finds_the_blocks() -> None:
    """The checks above only mean something if the parser sees the blocks."""
    includes = [block for block in DOC_BLOCKS if _includes(block)]
    assert len(includes) >= 30 and len(FRAGMENTS) >= 5 and len(CONSOLE) >= 5
    assert any(len(_shown(block)) > len(block.body) for block in includes)


# -- the snippets -----------------------------------------------------------------------------

SNIPPET_FILES = sorted(SNIPPETS.glob("*.py"))


def test_every_snippet_is_shown_in_the_docs() -> None:
    included = [m["path"] for block in DOC_BLOCKS for m in _includes(block)]
    copied = re.findall(r"<!-- (docs/snippets/\w+\.py)", README.read_text())
    shown = {(ROOT / path).resolve() for path in [*included, *copied]}
    unused = [path.name for path in SNIPPET_FILES if path not in shown]
    assert not unused, f"docs/snippets files no page shows: {unused}"


def _command(path: Path) -> list[str]:
    m = _RUN.search(path.read_text())
    assert m, f"{path.name}: its docstring says how to run it: Run it: `python {path.name}`"
    argv = shlex.split(m["command"])
    assert path.name in argv, f"{path.name}: 'Run it:' runs {argv}, not this file"
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return [sys.executable, "-m", *argv]


@pytest.mark.parametrize("path", SNIPPET_FILES, ids=[p.name for p in SNIPPET_FILES])
def test_snippet_asserts_and_says_how_to_run_it(path: Path) -> None:
    _command(path)
    assert re.search(r"^\s*(assert|with pytest\.raises)\b", path.read_text(), re.M), (
        f"{path.name} asserts nothing: a snippet proves what its page claims"
    )


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    # Plugins of this dev environment that the snippets do not use and that take
    # seconds to import (hypothesis, trio through anyio); perrequest's loads as usual.
    env["PYTEST_ADDOPTS"] = "-p no:hypothesispytest -p no:anyio -p no:asyncio"
    return subprocess.run(
        command, cwd=SNIPPETS, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def snippet_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, Future[object]]]:
    """Start every selected snippet at once, a few processes at a time."""
    wanted = [
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_snippet_runs"
    ]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        yield {path.name: pool.submit(_run, _command(path)) for path in wanted}


@pytest.mark.slow  # a Python process per snippet: make check skips them
@pytest.mark.parametrize("path", SNIPPET_FILES, ids=[p.name for p in SNIPPET_FILES])
def test_snippet_runs(path: Path, snippet_runs: dict[str, Future[object]]) -> None:
    done = snippet_runs[path.name].result()
    assert isinstance(done, subprocess.CompletedProcess)
    assert done.returncode == 0, (
        f"`{shlex.join(done.args)}` in docs/snippets failed:\n{done.stdout}\n{done.stderr}"
    )
    assert "Traceback" not in done.stderr, done.stderr


# -- the API reference ------------------------------------------------------------------------

API = (DOCS / "api.md").read_text()
HELPERS = ["get", "set", "get_or_set", "delete"]
INTEGRATIONS = ["asgi", "wsgi", "django", "flask", "celery", "testing", "redis"]


def _public() -> list[str]:
    names = [f"perrequest.{name}" for name in [*perrequest.__all__, *HELPERS]]
    for module in INTEGRATIONS:
        mod = importlib.import_module(f"perrequest.{module}")
        names += [f"perrequest.{module}.{name}" for name in mod.__all__]
    return names


PUBLIC = _public()


@pytest.mark.parametrize("name", PUBLIC)
def test_api_reference_renders_every_public_name(name: str) -> None:
    rendered = re.search(rf"^::: {re.escape(name)}$", API, re.M)
    assert rendered, f"docs/api.md does not render {name}: add '::: {name}'"


def _object(name: str) -> object:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring_describing_its_parameters(name: str) -> None:
    """Each parameter gets a line of its own in an ``Args:`` (or, for a dataclass's
    fields, ``Attributes:``) section, which mkdocstrings renders as a table; a
    small helper may name it in its summary instead (``key``)."""
    obj = _object(name)
    if isinstance(obj, str | int):  # a constant: its docstring follows it in the source
        attr = name.rpartition(".")[2]
        sources = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
        assert re.search(rf'^{attr}\b.*=.*\n"""', sources, re.M), f"{name} has no docstring"
        return
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring: the API reference renders nothing for it"
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return
    target = obj.__dict__.get("__init__") if inspect.isclass(obj) else obj
    if not inspect.isfunction(target):
        return
    doc += "\n" + ((inspect.getdoc(target) or "") if target is not obj else "")
    parameters = inspect.signature(target).parameters.values()
    missing = [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
        and p.name not in ("self", "cls")
        and not re.search(rf"^\s+{p.name}(?: \([^)]*\))?: \S", doc, re.M)
        and not (len(doc.splitlines()) <= 2 and f"``{p.name}" in doc)
    ]
    assert not missing, f"the docstring of {name} does not describe {missing}"


def test_every_page_is_in_the_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s+([\w/-]+\.md)\s*$", config, re.M))
    pages = {str(page.relative_to(DOCS)) for page in PAGES}
    assert pages <= listed, f"pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
