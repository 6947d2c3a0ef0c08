"""The API reference, generated from ``gradtx.__all__`` at every build so that it cannot go stale.

Every public name gets an autodoc entry on the page of the module that defines it (``obj.__module__``,
or for an alias the module whose source assigns it), documented under its public name ``gradtx.<name>``.
Record classes (NamedTuples and dataclasses) get a list of their fields, each with its annotation and
the comment written next to it in the source; a NamedTuple without a docstring of its own shows that
list instead of ``Name(field, ...)``. An alias such as ``Schedule = Callable[...]`` shows its comment.

The module imports no Sphinx at import time: tests/test_docs.py checks the same pages the build writes.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import inspect
import io
import re
import tokenize
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

# Modules that ``import gradtx`` does not import because they need an optional dependency: each one's
# public functions get a page, documented under the module's own name (``gradtx.plotting.plot_*``).
OPTIONAL_MODULES = ("gradtx.plotting",)

# The pages come in this order (the order in which a reader meets the ideas); a module not listed here
# comes after these, by name.
MODULE_ORDER = (
    "gradtx.base",
    "gradtx.transforms",
    "gradtx.optimizers",
    "gradtx.adadelta",
    "gradtx.lion",
    "gradtx.hyper",
    "gradtx.schedules",
    "gradtx.plateau",
    "gradtx.routing",
    "gradtx.regularizers",
    "gradtx.constraints",
    "gradtx.pruning",
    "gradtx.clipping",
    "gradtx.accumulation",
    "gradtx.ema",
    "gradtx.loss_scaling",
    "gradtx.grouping",
    "gradtx.engine",
    "gradtx.training",
    "gradtx.data",
    "gradtx.checkpoints",
    "gradtx.sweeps",
    "gradtx.range_tests",
    "gradtx.plotting",
)

API_DIR = "api"  # under the docs source folder; generated, ignored by git


class Entry(NamedTuple):
    name: str  # as written in the page under ``.. currentmodule:: <namespace>``
    namespace: str  # "gradtx", or the optional module's name
    module: str  # the module that defines it: the page it is on
    kind: str  # "function", "class" or "data"
    obj: Any

    @property
    def qualname(self) -> str:
        return f"{self.namespace}.{self.name}"


class Field(NamedTuple):
    name: str
    annotation: str  # the source text of the annotation
    default: str | None  # the source text of the default, if any
    comment: str  # the comment next to (or right above) the field, "" if none


@cache
def _source(module: str) -> tuple[ast.Module, dict[int, tuple[str, bool]]]:
    """The module's syntax tree and its comments: line -> (text, whether the comment is alone on its line)."""
    path = importlib.util.find_spec(module).origin
    text = Path(path).read_text(encoding="utf-8")
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[: tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    return ast.parse(text), comments


def _comment_of(node: ast.stmt, comments: dict[int, tuple[str, bool]]) -> str:
    """The comment at the end of ``node``'s last line, or else the comment lines right above it."""
    trailing = comments.get(node.end_lineno)
    if trailing and not trailing[1]:
        return trailing[0]
    above, line = [], node.lineno - 1
    while line in comments and comments[line][1]:
        above.insert(0, comments[line][0])
        line -= 1
    return " ".join(above)


def _defines(tree: ast.Module, name: str) -> ast.stmt | None:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign) or type(node).__name__ == "TypeAlias":  # x: T = v, type x = v
            targets = [node.target if isinstance(node, ast.AnnAssign) else node.name]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
    return None


def _package_root() -> Path:
    return Path(importlib.util.find_spec("gradtx").origin).parent


def _module_imports(module: str) -> set[str]:
    """The gradtx modules that ``module``'s module-level import statements name (not its functions')."""
    path = _package_root() / ("__init__.py" if module == "gradtx" else module.split(".", 1)[1] + ".py")
    found = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue  # a function's imports run when it is called
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("gradtx")
            ):
                found.add(node.module)
                found.update(f"gradtx.{a.name}" for a in node.names if node.module == "gradtx")
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("gradtx."))
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m != "gradtx" and (_package_root() / (m.split(".", 1)[1] + ".py")).exists()}


def imported_modules() -> set[str]:
    """The gradtx modules that ``import gradtx`` loads, read from the sources' import statements (so a
    module that nothing imports yet, work in progress, gets no page and breaks no build)."""
    loaded, todo = set(), ["gradtx"]
    while todo:
        for m in _module_imports(todo.pop()) - loaded:
            loaded.add(m)
            todo.append(m)
    return loaded


def _submodules() -> list[str]:
    """The modules the reference documents: those ``import gradtx`` loads, and `OPTIONAL_MODULES`."""
    return sorted(imported_modules() | set(OPTIONAL_MODULES))


def home_module(name: str, obj: Any) -> str:
    """The module that defines ``obj``: its ``__module__`` for a function or class of gradtx, else the
    module whose source assigns ``name`` at its top level (a type alias such as ``Schedule``)."""
    module = getattr(obj, "__module__", None)
    if (inspect.isfunction(obj) or inspect.isclass(obj)) and str(module).startswith("gradtx."):
        return module
    for candidate in _submodules():
        if _defines(_source(candidate)[0], name) is not None:
            return candidate
    raise LookupError(f"gradtx_api: no gradtx module defines {name!r}")


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "class"
    if callable(obj) and not hasattr(obj, "__origin__"):  # a typing alias is callable too
        return "function"
    return "data"


def entries() -> list[Entry]:
    """Every documented name: ``gradtx.__all__`` and the public functions of `OPTIONAL_MODULES`."""
    import gradtx

    found = []
    for name in gradtx.__all__:
        obj = getattr(gradtx, name)
        found.append(Entry(name, "gradtx", home_module(name, obj), _kind(obj), obj))
    for module in OPTIONAL_MODULES:
        mod = importlib.import_module(module)
        names = getattr(mod, "__all__", None) or [
            n
            for n, v in vars(mod).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == module
        ]
        found.extend(Entry(n, module, module, _kind(getattr(mod, n)), getattr(mod, n)) for n in names)
    return found


def record_fields(cls: type) -> list[Field] | None:
    """The fields of a NamedTuple or dataclass, in order, from its source; None for other classes."""
    if not (hasattr(cls, "_fields") and issubclass(cls, tuple)) and not dataclasses.is_dataclass(cls):
        return None
    tree, comments = _source(cls.__module__)
    node = _defines(tree, cls.__name__)
    if not isinstance(node, ast.ClassDef):  # built by a call, NamedTuple("Name", [...]): no comments to read
        names = cls._fields if hasattr(cls, "_fields") else [f.name for f in dataclasses.fields(cls)]
        hints, defaults = getattr(cls, "__annotations__", {}), getattr(cls, "_field_defaults", {})
        return [
            Field(n, _annotation_text(hints.get(n, "")), repr(defaults[n]) if n in defaults else None, "")
            for n in names
        ]
    return [
        Field(
            stmt.target.id,
            ast.unparse(stmt.annotation),
            None if stmt.value is None else ast.unparse(stmt.value),
            _comment_of(stmt, comments),
        )
        for stmt in node.body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    ]


def _annotation_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if inspect.isclass(annotation):
        return (
            annotation.__name__
            if annotation.__module__ == "builtins"
            else f"{annotation.__module__}.{annotation.__qualname__}"
        )
    return repr(annotation).replace("typing.", "")


def own_docstring(obj: Any) -> str:
    """The docstring written for ``obj``: "" for a NamedTuple's generated ``Name(a, b)`` or an alias."""
    if _kind(obj) == "data":
        return ""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and re.fullmatch(rf"{obj.__name__}\(.*\)", doc, flags=re.S):
        return ""  # generated by NamedTuple, ``Name(a, b)``, or by dataclass, ``Name(a: int, b: str)``
    return doc


def alias_comment(entry: Entry) -> str:
    tree, comments = _source(entry.module)
    node = _defines(tree, entry.name)
    return "" if node is None else _comment_of(node, comments)


_REST_SPECIAL = re.compile(r"([\\`*_|])")


def _plain(text: str) -> str:
    """Source comments are plain text: escape what reST would read as markup."""
    return _REST_SPECIAL.sub(r"\\\1", text)


def public_type(annotation: str) -> bool:
    """Whether an annotation names a public gradtx class, whose own entry documents the field."""
    import gradtx

    return annotation in gradtx.__all__ and inspect.isclass(getattr(gradtx, annotation))


def fields_rst(fields: list[Field]) -> list[str]:
    if not fields:
        return []
    lines = [".. rubric:: Fields", ""]
    for f in fields:
        typ = f"`{f.annotation}`" if public_type(f.annotation) else f"``{f.annotation}``"
        default = f" = ``{f.default}``" if f.default is not None else ""
        comment = f" -- {_plain(f.comment)}" if f.comment else ""
        lines.append(f"- **{f.name}** ({typ}){default}{comment}")
    return [*lines, ""]


def documentation(entry: Entry) -> list[str]:
    """The reST an entry's page shows under its signature: its docstring, and its fields for a record
    class; for an alias, its source comment. The build puts exactly these lines on the page."""
    if entry.kind == "data":
        return [_plain(alias_comment(entry))]
    lines = own_docstring(entry.obj).splitlines()
    if entry.kind == "class":
        fields = record_fields(entry.obj) or []
        if not lines and fields:  # a summary line for the tables of contents
            kind = "NamedTuple" if issubclass(entry.obj, tuple) else "dataclass"
            lines = [f"A {kind} of " + ", ".join(f"``{f.name}``" for f in fields) + "."]
        if lines and fields:
            lines.append("")
        lines += fields_rst(fields)
    return lines


def contract(entry: Entry) -> str:
    """The first paragraph of what the page says about ``entry``: its formula or contract."""
    text = own_docstring(entry.obj) if entry.kind != "data" else alias_comment(entry)
    if not text and entry.kind == "class":
        fields = record_fields(entry.obj) or []
        text = "; ".join(f"{f.name}: {f.comment}" for f in fields if f.comment)
    return text.strip().split("\n\n")[0]


def _order(module: str) -> tuple[int, str]:
    return (MODULE_ORDER.index(module) if module in MODULE_ORDER else len(MODULE_ORDER), module)


def _line(entry: Entry) -> int:
    node = _defines(_source(entry.module)[0], getattr(entry.obj, "__name__", entry.name))
    return node.lineno if node is not None else 0


def _title(text: str, char: str = "=") -> list[str]:
    return [text, char * len(text), ""]


_DIRECTIVE = {"function": "autofunction", "class": "autoclass", "data": "autodata"}


def pages() -> dict[str, str]:
    """The API pages, ``{path relative to the docs source folder: reST}``: one per module, in
    `MODULE_ORDER`, each entry in source order, and an index page with their table of contents."""
    by_module: dict[str, list[Entry]] = {module: [] for module in _submodules()}
    for entry in entries():
        by_module.setdefault(entry.module, []).append(entry)
    modules = sorted(by_module, key=_order)
    index = [
        *_title("API reference"),
        "Every public name of gradtx (``gradtx.__all__``), on the page of the module that defines it.",
        "Each is used as ``gradtx.<name>``; the functions of ``gradtx.plotting`` need matplotlib.",
        "",
        ".. toctree::",
        "   :maxdepth: 1",
        "",
        *(f"   {module}" for module in modules),
        "",
    ]
    out = {f"{API_DIR}/index.rst": "\n".join(index)}
    for module in modules:
        found = sorted(by_module[module], key=_line)
        # A module named like one of its functions (gradtx.adadelta) leaves that name to the function.
        clash = module.rsplit(".", 1)[-1] in {e.name for e in found}
        lines = [*_title(module), f".. automodule:: {module}", *(["   :no-index:"] if clash else []), ""]
        if found:  # a module without public names (gradtx.checkpoints) shows its docstring only
            lines += [
                f".. currentmodule:: {found[0].namespace}",
                "",
                ".. autosummary::",
                "   :nosignatures:",
                "",
            ]
            lines += [*(f"   {e.name}" for e in found), ""]
        for e in found:
            lines += [f".. {_DIRECTIVE[e.kind]}:: {e.name}"]
            if e.kind == "class":
                lines += ["   :members:"]
            lines += [""]
        out[f"{API_DIR}/{module}.rst"] = "\n".join(lines)
    return out


def write_pages(srcdir: Path) -> None:
    """Writes `pages` under ``srcdir``, leaving unchanged files untouched (so a rebuild reads only what
    changed) and removing the pages of modules that are gone."""
    wanted = pages()
    folder = srcdir / API_DIR
    folder.mkdir(exist_ok=True)
    for stale in set(folder.glob("*.rst")) - {srcdir / p for p in wanted}:
        stale.unlink()
    for rel, text in wanted.items():
        path = srcdir / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")


def copy_notebooks(srcdir: Path, notebooks: Path) -> None:
    """Mirrors the repository's notebooks into ``srcdir/notebooks`` (rendered with their stored outputs)."""
    folder = srcdir / "notebooks"
    folder.mkdir(exist_ok=True)
    wanted = {p.name: p for p in sorted(notebooks.glob("*.ipynb"))}
    for stale in folder.glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    for name, source in wanted.items():
        target = folder / name
        data = source.read_bytes()
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)


# --- Sphinx hooks ----------------------------------------------------------------------------------------


@cache
def _by_qualname() -> dict[str, Entry]:
    return {e.qualname: e for e in entries()}


_TABLE_ROW = re.compile(r"^(\s*)\|.*\|\s*$")
_TABLE_RULE = re.compile(r"^\s*\|(\s*:?-{3,}:?\s*\|)+\s*$")


def _cells(row: str) -> list[str]:
    """The cells of a Markdown table row; a ``|`` inside a code span or escaped as ``\\|`` is text."""
    cells, cell, span, i = [], "", 0, 0
    row = row.strip()[1:-1]
    while i < len(row):
        if row.startswith("\\|", i):
            cell, i = cell + "|", i + 2
        elif row[i] == "`":
            run = len(row[i:]) - len(row[i:].lstrip("`"))
            span = 0 if run == span else span or run  # a code span closes on a run of its own length
            cell, i = cell + "`" * run, i + run
        elif row[i] == "|" and not span:
            cells.append(cell.strip())
            cell, i = "", i + 1
        else:
            cell, i = cell + row[i], i + 1
    return [*cells, cell.strip()]


def markdown_tables(lines: list[str]) -> list[str]:
    """Docstrings are Markdown-ish: a pipe table (a header row, a ``|---|`` rule, rows) becomes a reST
    ``list-table``; every other line is left as it is."""
    out, i = [], 0
    while i < len(lines):
        head = _TABLE_ROW.match(lines[i])
        if head and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
            indent, rows, j = head.group(1), [_cells(lines[i])], i + 2
            while j < len(lines) and _TABLE_ROW.match(lines[j]):
                rows.append(_cells(lines[j]))
                j += 1
            out += ["", f"{indent}.. list-table::", f"{indent}   :header-rows: 1", ""]
            for row in rows:
                for k, cell in enumerate(row):
                    out.append(f"{indent}   {'* -' if k == 0 else '  -'} {cell or '..'}".rstrip())
            out.append("")
            i = j
        else:
            out.append(lines[i])
            i += 1
    return out


def _process_docstring(app, what, name, obj, options, lines) -> None:
    entry = _by_qualname().get(name)
    if entry is not None and entry.kind in ("class", "data"):
        lines[:] = documentation(entry)
    lines[:] = markdown_tables(lines)


def _skip_member(app, what, name, obj, skip, options):
    if type(obj).__name__ == "_tuplegetter":  # a NamedTuple field: listed under "Fields" instead
        return True
    return None


# Names of Python and of other libraries, left unlinked (no inventory is fetched: the build is offline).
EXTERNAL = frozenset(
    "jax jnp lax np numpy optax flax nnx linen keras tf tfmot orbax matplotlib plt sklearn fnmatch math "
    "functools itertools typing collections dataclasses".split()
) | frozenset(dir(builtins))
_DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def exists_in_gradtx(target: str) -> bool:
    """Whether ``target`` names an object: ``gradtx.a.b``, or ``a.b`` with ``a`` in a gradtx module."""
    first, *rest = target.split(".")
    if first == "gradtx":
        starts = [importlib.import_module("gradtx")]
    else:  # the modules are imported already: gradtx, and by `entries` the optional ones
        modules = [importlib.import_module(m) for m in ("gradtx", *_submodules())]
        starts = [vars(m)[first] for m in modules if first in vars(m)]
    for obj in starts:
        for part in rest:
            if inspect.ismodule(obj) and not hasattr(obj, part):
                try:
                    importlib.import_module(f"{obj.__name__}.{part}")
                except ImportError:
                    break
            if not hasattr(obj, part):
                break
            obj = getattr(obj, part)
        else:
            return True
    return False


def _missing_reference(app, env, node, contnode):
    """A single-backtick name resolves to its public entry: `chain`, `gradtx.base.chain`,
    `gradtx.chain` all link to ``gradtx.chain``, `SweepResult.rows` to ``gradtx.SweepResult.rows``.
    A name with no entry of its own (an internal one such as `Run`) is shown unlinked if it exists in
    gradtx; one that names nothing is a warning (a typo, or a name that was removed), unless it belongs to
    another library (`EXTERNAL`: `jax.vmap`, `optax.chain`)."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    py = env.get_domain("py")
    short = target.rsplit(".", 1)[-1]
    candidates = [] if target.startswith("gradtx.") else [f"gradtx.{target}"]
    candidates += [
        c for c in (f"gradtx.{short}", *(f"{m}.{short}" for m in OPTIONAL_MODULES)) if c in _by_qualname()
    ]
    for candidate in candidates:
        found = py.resolve_xref(env, node["refdoc"], app.builder, "obj", candidate, node, contnode)
        if found is not None:
            return found
    if (
        node.get("reftype") == "obj"
        and _DOTTED_NAME.match(target)
        and target.split(".")[0] not in EXTERNAL
        and not exists_in_gradtx(target)
    ):
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "gradtx_api: `%s` names nothing in gradtx (a typo? a library missing from EXTERNAL?)",
            target,
            location=node,
            type="ref",
            subtype="gradtx",
        )
    return None


def _builder_inited(app) -> None:
    srcdir = Path(app.srcdir)
    write_pages(srcdir)
    copy_notebooks(srcdir, srcdir.parent / "notebooks")


def setup(app):
    app.connect("builder-inited", _builder_inited)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("missing-reference", _missing_reference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
