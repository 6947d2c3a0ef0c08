"""The documentation: every public name states its formula or contract on a generated API page, and
every Python block of README.md and docs/*.md runs.

The API pages are the ones the Sphinx build writes (docs/_ext/gradtx_api.py, imported here without
Sphinx); ``make docs`` builds them with warnings as errors.

Code blocks: each ```python block of a file runs, in order, in one namespace per file, as a reader
would paste them one after the other. A block that is not meant to run says so on its fence:
```python no-run (shell commands use ```bash or a bare fence). `PREAMBLES` holds the only code that runs
before a file's blocks; it stays empty while every block is self-contained.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

import gradtx

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_spec = importlib.util.spec_from_file_location("gradtx_api", DOCS / "_ext" / "gradtx_api.py")
api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(api)

ENTRIES = api.entries()
MIN_WORDS = 5  # a contract is a sentence or a formula, not a word or two


# --- (a) every public name has its contract on its page -------------------------------------------------


def test_entries_cover_all_of_gradtx_all():
    assert [e.name for e in ENTRIES if e.namespace == "gradtx"] == list(gradtx.__all__)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.qualname)
def test_public_name_states_its_contract(entry):
    words = api.contract(entry).split()
    assert len(words) >= MIN_WORDS, (
        f"{entry.qualname} ({entry.module}): the first paragraph of its docstring should state its formula "
        f"or contract in a sentence, got {' '.join(words)!r}"
    )


@pytest.mark.parametrize(
    "entry",
    [e for e in ENTRIES if e.kind == "class" and not api.own_docstring(e.obj)],
    ids=lambda e: e.qualname,
)
def test_class_without_docstring_documents_every_field(entry):
    fields = api.record_fields(entry.obj)
    assert fields is not None, f"{entry.qualname}: a class that is not a record needs a docstring"
    bare = [f.name for f in fields if not f.comment and not api.public_type(f.annotation)]
    assert not bare, (
        f"{entry.qualname}: give it a docstring, or a comment next to each field; undocumented: {bare}"
    )


def _directives(pages: dict[str, str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path, text in pages.items():
        for name in re.findall(r"^\.\. auto(?:function|class|data):: (\S+)$", text, flags=re.M):
            found.setdefault(name, []).append(path)
    return found


def test_every_public_name_is_on_the_page_of_its_module():
    found = _directives(api.pages())
    for e in ENTRIES:
        assert found.get(e.name) == [f"api/{e.module}.rst"], f"{e.qualname} is on {found.get(e.name)}"


def test_api_index_lists_every_module_page():
    pages = api.pages()
    toctree = re.findall(r"^   (gradtx\.\S+)$", pages["api/index.rst"], flags=re.M)
    assert sorted(f"api/{m}.rst" for m in toctree) == sorted(p for p in pages if p != "api/index.rst")


def test_functions_and_classes_are_filed_under_their_defining_module():
    for e in ENTRIES:
        if e.kind in ("function", "class"):
            assert e.module == e.obj.__module__, e.qualname


def test_an_alias_is_filed_under_the_module_that_assigns_it():
    # ``Schedule = Callable[...]`` has no __module__ of its own; base.py assigns it.
    source = (ROOT / "gradtx" / "base.py").read_text()
    assert re.search(r"^Schedule\b.*=", source, flags=re.M)
    assert api.home_module("Schedule", gradtx.Schedule) == "gradtx.base"


def test_class_page_replaces_a_generated_namedtuple_docstring_by_its_fields():
    (entry,) = [e for e in ENTRIES if e.name == "ChainState"]
    text = "\n".join(api.documentation(entry))
    assert "ChainState(step, inner)" not in text
    assert re.search(r"\*\*step\*\* \(``jax.Array``\) -- \S", text) and "**inner**" in text


def test_field_comments_are_escaped_for_rest():
    # A comment such as "(k, *shape)" must not open an emphasis in reST.
    lines = api.fields_rst([api.Field("rows", "tuple", None, "stacked leaves (k, *shape) of a_ group")])
    assert r"(k, \*shape) of a\_ group" in lines[2]


def test_every_module_is_imported_by_gradtx_or_listed_as_optional():
    # The reference documents the modules that ``import gradtx`` loads (read from the import statements)
    # and OPTIONAL_MODULES; any other module would be left out.
    modules = {f"gradtx.{p.stem}" for p in (ROOT / "gradtx").glob("*.py") if not p.stem.startswith("_")}
    missing = modules - api.imported_modules() - set(api.OPTIONAL_MODULES)
    assert not missing, (
        f"not loaded by `import gradtx` nor in OPTIONAL_MODULES (docs/_ext/gradtx_api.py): {missing}"
    )


def test_imported_modules_are_those_python_loads():
    # The static reading of the import statements agrees with what the interpreter does.
    code = "import sys, gradtx; print(*sorted(m for m in sys.modules if m.startswith('gradtx.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert set(out.stdout.split()) == api.imported_modules()


def test_every_module_has_a_page():
    pages = api.pages()
    for module in api.imported_modules() | set(api.OPTIONAL_MODULES):
        assert f".. automodule:: {module}" in pages[f"api/{module}.rst"]


# --- (b) every Python block of the README and the docs runs ---------------------------------------------

RUNNABLE = {"python", "py", "python3"}
NO_RUN = "no-run"
PREAMBLES: dict[str, str] = {}  # file (relative to the repository) -> code run before its blocks


class Block(NamedTuple):
    path: str
    line: int  # the first line of the code, 1-based
    info: str  # the fence's info string: "python", "python no-run", "bash", ""
    code: str

    @property
    def runs(self) -> bool:
        words = self.info.split()
        return bool(words) and words[0] in RUNNABLE and NO_RUN not in words[1:]


_FENCE = re.compile(r"^\s*(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


def code_blocks(text: str, path: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order (CommonMark fences of ``` or ~~~)."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m["fence"]
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = textwrap.dedent("\n".join(lines[i + 1 : j]))  # a block in a list item is indented
        blocks.append(Block(path, i + 2, m["info"].strip(), body))
        i = j + 1
    return blocks


def run_blocks(blocks: list[Block], preamble: str = "") -> int:
    """Executes the runnable blocks in order in one namespace; an error names the file and line."""
    namespace: dict = {"__name__": "__snippets__"}
    exec(compile(preamble, "<preamble>", "exec"), namespace)
    ran = 0
    for b in blocks:
        if not b.runs:
            continue
        # Pad with newlines so that a traceback shows the line number in the Markdown file.
        code = compile("\n" * (b.line - 1) + b.code, b.path, "exec")
        try:
            exec(code, namespace)
        except Exception as error:
            raise AssertionError(f"{b.path}:{b.line}: the block fails: {error!r}") from error
        ran += 1
    return ran


def _markdown_files() -> list[Path]:
    generated = {DOCS / "_build", DOCS / api.API_DIR, DOCS / "notebooks"}
    docs = [p for p in sorted(DOCS.rglob("*.md")) if not any(g in p.parents for g in generated)]
    return [ROOT / "README.md", *docs]


MARKDOWN = _markdown_files()


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    rel = str(path.relative_to(ROOT))
    run_blocks(code_blocks(path.read_text(encoding="utf-8"), rel), PREAMBLES.get(rel, ""))


def test_readme_python_blocks_are_found():
    blocks = code_blocks((ROOT / "README.md").read_text(encoding="utf-8"), "README.md")
    runnable = [b for b in blocks if b.runs]
    assert len(runnable) >= 5, [b.info for b in blocks]
    assert any("gradtx.adam(" in b.code for b in runnable)


def test_python_fences_take_no_option_but_no_run():
    # A ```python block that must not run says ``no-run``; anything else in a python fence runs.
    for path in MARKDOWN:
        for b in code_blocks(path.read_text(encoding="utf-8"), str(path)):
            words = b.info.split()
            if words and words[0] in RUNNABLE:
                assert set(words[1:]) <= {NO_RUN}, f"{b.path}:{b.line}: unknown fence option {b.info!r}"


def test_a_failing_block_fails_with_its_file_and_line():
    text = "intro\n\n```python\nx = 1\n```\n\ntext\n\n```python\ny = x / 0\n```\n"
    with pytest.raises(AssertionError, match=r"doc\.md:10: the block fails: ZeroDivisionError"):
        run_blocks(code_blocks(text, "doc.md"))


def test_blocks_share_one_namespace_and_skip_no_run_and_other_languages():
    text = (
        "```python\nx = 2\n```\n"
        "```python no-run\nraise SystemExit('not run')\n```\n"
        "```bash\nexit 1\n```\n"
        "````python\nassert x == 2\n````\n"
    )
    blocks = code_blocks(text, "doc.md")
    assert [b.info for b in blocks] == ["python", "python no-run", "bash", "python"]
    assert run_blocks(blocks) == 2


def test_a_markdown_table_in_a_docstring_becomes_a_list_table():
    lines = [
        "Options:",
        "",
        "| option | rule |",
        "|---|:---:|",
        "| ``a | b`` | `chain` \\| x |",
        "| c |  |",
        "end",
    ]
    out = api.markdown_tables(lines)
    assert out[:2] == ["Options:", ""] and out[-1] == "end"
    assert ".. list-table::" in out and "   :header-rows: 1" in out
    assert [line.strip() for line in out if line.strip().startswith(("* -", "-"))] == [
        "* - option",
        "- rule",
        "* - ``a | b``",
        "- `chain` | x",
        "* - c",
        "- ..",
    ]
