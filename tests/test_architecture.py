"""The shape of the package, checked with ``ast`` over ``src/deltaexit`` (issue 12: "one shape for the core").

1. No import cycle among the package's modules.
2. No module imports the top-level facade (``import deltaexit``, ``from deltaexit import X``) except the facade.
3. No private name (leading underscore, not dunder) crosses a module boundary.
4. No function is longer than 80 lines, its docstring aside.

What counts as an import edge ``A -> B`` (for 1): every ``import``/``from ... import`` in ``A``, at module level
*or inside a function* (a lazy import still ties ``A`` to ``B``: the cycle is only postponed to the first call),
to the module imported and to each package above it that ``A`` is not itself inside (importing
``deltaexit.generation.cost`` runs ``deltaexit/generation/__init__.py``). Left out: imports under
``if TYPE_CHECKING:`` (never executed), and the top-level ``deltaexit`` package (a lazy facade, PEP 562, that runs
no submodule on import; importing it from inside is test 2's business).

Each test fails with the full list of offenders, one per line, as ``path:line: what``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "deltaexit"
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from the module that holds it."""

    module: str  # the module named (``deltaexit.x`` in ``from deltaexit.x import y``)
    names: tuple[str, ...]  # the names imported from it (empty for ``import deltaexit.x``)
    line: int
    bound_as: tuple[str, ...]  # the local names the statement binds


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path = SRC) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


MODULES = source_files()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Every executed import of ``module`` (module level and inside functions; not under TYPE_CHECKING)."""
    is_package = path.name == "__init__.py"

    def walk(node: ast.AST) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child.test):
                for sub in child.orelse:
                    yield from walk_one(sub)
                continue
            yield from walk_one(child)

    def walk_one(node: ast.AST) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                yield Import(alias.name, (), node.lineno, (bound,))
        elif isinstance(node, ast.ImportFrom):
            target = resolve_relative(module, is_package, node.level, node.module) if node.level else node.module or ""
            names = tuple(a.name for a in node.names)
            yield Import(target, names, node.lineno, tuple(a.asname or a.name for a in node.names))
        else:
            yield from walk(node)

    yield from walk(parse(path))


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(modules: dict[str, Path] = MODULES) -> dict[str, dict[str, int]]:
    """``edges[A][B] = line`` for each package module ``A`` that imports package module ``B``."""
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        own = {module, *ancestors(module)}
        for imp in imports_of(module, path):
            if imp.module != PACKAGE and not imp.module.startswith(PACKAGE + "."):
                continue
            targets = [imp.module]
            targets += [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in modules]
            for target in targets:
                for name in [*ancestors(target), target]:
                    if name in modules and name not in own and name != PACKAGE:
                        edges[module].setdefault(name, imp.line)
    return edges


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def where(module: str, line: int) -> str:
    """``src/deltaexit/x.py:LINE`` for a package module (the dotted name for a made-up one)."""
    path = MODULES.get(module)
    return f"{path.relative_to(SRC.parent)}:{line}" if path is not None else f"{module}:{line}"


def fail_with(title: str, offenders: list[str]) -> None:
    if offenders:
        pytest.fail(f"{title} ({len(offenders)}):\n" + "\n".join(offenders), pytrace=False)


def test_no_import_cycles():
    edges = import_edges()
    offenders = []
    for component in strongly_connected(edges):
        members = set(component)
        inner = [
            f"  {where(a, line)}: {a} -> {b}" for a in component for b, line in sorted(edges[a].items()) if b in members
        ]
        offenders.append(f"cycle among {component}:\n" + "\n".join(inner))
    fail_with("import cycles among src/deltaexit modules", offenders)


def test_no_module_imports_the_facade():
    offenders = []
    for module, path in MODULES.items():
        if module == PACKAGE:
            continue
        for imp in imports_of(module, path):
            if imp.module != PACKAGE:
                continue  # ``import deltaexit.x`` (no ``as``) is recorded as "deltaexit.x": a submodule import
            if imp.names:
                what = f"from deltaexit import {', '.join(imp.names)}"
            else:
                what = "import deltaexit" + ("" if imp.bound_as == (PACKAGE,) else f" as {imp.bound_as[0]}")
            offenders.append(f"{where(module, imp.line)}: {what} (import the defining submodule instead)")
    fail_with("modules importing the deltaexit facade", offenders)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_bindings(module: str, path: Path) -> dict[str, str]:
    """Local names bound to something from another package module: ``{local name: where it comes from}``."""
    bound: dict[str, str] = {}
    for imp in imports_of(module, path):
        if not imp.module.startswith(PACKAGE + ".") or imp.module == module:
            continue
        if imp.names:
            for name, local in zip(imp.names, imp.bound_as):
                bound[local] = f"{imp.module}.{name}"
        elif imp.bound_as[0] != PACKAGE:  # import deltaexit.x as m
            bound[imp.bound_as[0]] = imp.module
    return bound


def private_members(path: Path) -> set[str]:
    """Private attribute names a module's classes define (``self._x = ...``, ``_x: T`` fields, ``def _x``)."""
    names: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return {n for n in names if is_private(n)}


def private_uses(module: str, path: Path, members: dict[str, set[str]]) -> Iterator[str]:
    """``x._y`` in ``module`` where ``x`` is bound to another package module's object, or where ``_y`` is a
    private member only other package modules' classes define (``state._logits`` on a ``LayerState``)."""
    bound = package_bindings(module, path)
    elsewhere: dict[str, list[str]] = {}
    for other, names in members.items():
        if other != module:
            for name in names:
                elsewhere.setdefault(name, []).append(other)
    for node in ast.walk(parse(path)):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        owner = node.value.id if isinstance(node.value, ast.Name) else None
        if owner in bound:
            yield f"{where(module, node.lineno)}: {owner}.{node.attr} ({owner} is {bound[owner]})"
        elif owner not in ("self", "cls") and node.attr not in members[module] and node.attr in elsewhere:
            owners = ", ".join(sorted(elsewhere[node.attr]))
            yield f"{where(module, node.lineno)}: {ast.unparse(node)} (a private member of {owners})"


def test_no_private_names_across_modules():
    members = {module: private_members(path) for module, path in MODULES.items()}
    offenders = []
    for module, path in MODULES.items():
        for imp in imports_of(module, path):
            if not (imp.module == PACKAGE or imp.module.startswith(PACKAGE + ".")) or imp.module == module:
                continue
            for name in imp.names:
                if is_private(name):
                    offenders.append(f"{where(module, imp.line)}: from {imp.module} import {name}")
        offenders.extend(dict.fromkeys(private_uses(module, path, members)))  # once per line and text
    fail_with("private names used across modules (promote them to public names)", offenders)


def function_length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    assert node.end_lineno is not None
    length = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        assert first.end_lineno is not None
        length -= first.end_lineno - first.lineno + 1
    return length


def test_no_function_longer_than_80_lines():
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = function_length(node)
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{where(module, node.lineno)}: {node.name} has {length} lines")
    fail_with(f"functions longer than {MAX_FUNCTION_LINES} lines (docstring aside)", offenders)


# -- the checker checks itself on small made-up sources -------------------------------------------------------


def test_helpers_see_what_they_should(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import deltaexit.a\n")
    (pkg / "a.py").write_text("def f():\n    from deltaexit.sub.b import _hidden\n")
    (pkg / "sub" / "__init__.py").write_text("from deltaexit.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("import deltaexit as dx\nfrom deltaexit.a import f\n")
    modules = source_files(tmp_path)
    assert sorted(modules) == ["deltaexit", "deltaexit.a", "deltaexit.sub", "deltaexit.sub.b"]
    edges = import_edges(modules)
    assert edges["deltaexit"] == {}  # TYPE_CHECKING imports are not edges
    assert set(edges["deltaexit.a"]) == {"deltaexit.sub", "deltaexit.sub.b"}  # a lazy import, and its package
    assert set(edges["deltaexit.sub.b"]) == {"deltaexit.a"}  # the facade is no edge
    assert edges["deltaexit.sub"] == {"deltaexit.sub.b": 1}  # a package's own modules
    assert strongly_connected(edges) == [["deltaexit.a", "deltaexit.sub", "deltaexit.sub.b"]]
    assert [i.names for i in imports_of("deltaexit.a", modules["deltaexit.a"])] == [("_hidden",)]
    facade = next(imports_of("deltaexit.sub.b", modules["deltaexit.sub.b"]))
    assert (facade.module, facade.bound_as) == ("deltaexit", ("dx",))


def test_private_member_use_is_seen(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "state.py").write_text("class S:\n    def __init__(self):\n        self._cache = {}\n")
    (pkg / "user.py").write_text(
        "import deltaexit.state as st\n\ndef f(s, m):\n    m._private\n    st._hidden\n    return s._cache\n"
    )
    modules = source_files(tmp_path)
    members = {m: private_members(p) for m, p in modules.items()}
    assert members["deltaexit.state"] == {"_cache"}
    found = [line.split(": ", 1)[1] for line in private_uses("deltaexit.user", modules["deltaexit.user"], members)]
    assert found == ["st._hidden (st is deltaexit.state)", "s._cache (a private member of deltaexit.state)"]
