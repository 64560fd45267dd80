"""The layout's rules, checked on the source (fast, no database).

* No import cycle among the package's modules, imports inside functions included.
* Outside ``_backends/`` nothing imports a backend module or asks which database it runs
  on: what differs per database is a method of the backend (``_backends/_base.py``), or
  a function of the registry (``_backends/__init__.py``), the only place that looks at a
  dialect.
* ``_backends/_base.py``, the protocol every backend implements, imports no backend.
* Alembic's private API (underscore attributes of its objects, ``context_opts``, the
  ``autocommit_block`` we replace) is touched by ``_alembic.py`` alone.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "alembic_sqlite_lock"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
BACKENDS = f"{PACKAGE}._backends"


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module

    @property
    def package(self) -> str:
        """The package a relative import in this module starts from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _modules() -> dict[str, Module]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found[name] = Module(name, path, is_package, tree)
    return found


MODULES = _modules()


@dataclass(frozen=True)
class Import:
    target: str
    """The module of the package the statement imports (and so runs)."""
    line: int


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions too), but those that only a type
    checker runs (``if TYPE_CHECKING:``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _import_nodes(other)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _import_nodes(child)


def imports_of(module: Module) -> list[Import]:
    """The package's modules that ``module`` imports, relative imports resolved;
    ``from . import x`` imports the submodule ``x`` when there is one."""
    found = []
    for node in _import_nodes(module.tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names
                      if alias.name.split(".")[0] == PACKAGE]
            continue
        if node.level:
            base = module.package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        if source.split(".")[0] != PACKAGE:
            continue
        submodules = [f"{source}.{alias.name}" for alias in node.names
                      if f"{source}.{alias.name}" in MODULES]
        if len(submodules) < len(node.names):  # a name defined in ``source`` itself
            found.append(Import(source, node.lineno))
        found += [Import(name, node.lineno) for name in submodules]
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for module in MODULES.values():
        for imported in imports_of(module):
            # Importing a.b.c runs the packages a and a.b first: that implicit edge to
            # a module's own parents is not a dependency of the module's code.
            if imported.target != module.name and not module.name.startswith(
                imported.target + "."
            ):
                graph[module.name].add(imported.target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its first node repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor in on_path:
                return [*path[path.index(successor):], successor]
            if successor not in done:
                cycle = visit(successor)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_the_package_is_found() -> None:
    assert f"{PACKAGE}._env" in MODULES
    assert f"{BACKENDS}._base" in MODULES
    assert f"{BACKENDS}._sqlite._backend" in MODULES
    assert MODULES[BACKENDS].is_package


def test_relative_imports_are_resolved() -> None:
    targets = {i.target for i in imports_of(MODULES[f"{BACKENDS}._sqlite._backend"])}
    assert f"{PACKAGE}._errors" in targets
    assert f"{BACKENDS}._sqlite._diagnose" in targets  # from . import _diagnose


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# The seam -------------------------------------------------------------------------------
def _outside_backends() -> list[Module]:
    return [m for m in MODULES.values() if m.name != BACKENDS
            and not m.name.startswith(BACKENDS + ".")]


@pytest.mark.parametrize("module", _outside_backends(), ids=lambda m: m.name)
def test_only_the_registry_is_imported_from_backends(module: Module) -> None:
    wrong = [f"{module.path.name}:{i.line}: imports {i.target}"
             for i in imports_of(module) if i.target.startswith(BACKENDS + ".")]
    assert not wrong, (
        "Outside _backends/, import from the registry (`from ._backends import ...`) "
        "only; add what is needed there or to the Backend protocol:\n" + "\n".join(wrong)
    )


def _is_sqlite_text(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.lower().startswith("sqlite")
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_sqlite_text(element) for element in node.elts)
    return False


def dialect_tests(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, what) for each place that asks which database it runs on."""
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if (isinstance(node, ast.Attribute) and node.attr == "name"
                and isinstance(node.value, ast.Attribute) and node.value.attr == "dialect"):
            yield line, "dialect.name"
        if isinstance(node, ast.Attribute) and node.attr == "get_backend_name":
            yield line, "get_backend_name()"
        if isinstance(node, ast.Compare) and any(
            _is_sqlite_text(part) for part in (node.left, *node.comparators)
        ):
            yield line, 'a comparison with "sqlite..."'
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
                and any(_is_sqlite_text(arg) for arg in node.args)):
            yield line, f'.{node.func.attr}("sqlite...")'
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.alias):
            names = [node.name, node.asname or ""]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any("_sqlite" in name.split(".") or name.startswith("_sqlite") for name in names):
            yield line, "_sqlite"


@pytest.mark.parametrize("module", _outside_backends(), ids=lambda m: m.name)
def test_no_dialect_test_outside_backends(module: Module) -> None:
    found = [f"{module.path.name}:{line}: {what}" for line, what in dialect_tests(module.tree)]
    assert not found, (
        "Outside _backends/, code must not ask which database it runs on; make it a "
        "method of the Backend protocol (_backends/_base.py):\n" + "\n".join(found)
    )


def test_the_dialect_test_finds_each_kind() -> None:
    source = (
        "if connection.dialect.name == 'x': pass\n"
        "url.get_backend_name()\n"
        "if name == 'sqlite': pass\n"
        "url.startswith(('sqlite', 'postgres'))\n"
        "from ._backends import _sqlite\n"
    )
    found = [line for line, _ in dialect_tests(ast.parse(source))]
    assert sorted(set(found)) == [1, 2, 3, 4, 5]


def test_the_protocol_imports_no_backend() -> None:
    base = MODULES[f"{BACKENDS}._base"]
    wrong = [f"line {i.line}: {i.target}" for i in imports_of(base)
             if i.target == BACKENDS or i.target.startswith(BACKENDS + ".")]
    assert not wrong, "_backends/_base.py imports a backend:\n" + "\n".join(wrong)


# Alembic's private API -------------------------------------------------------------------
ALEMBIC_SHIM = f"{PACKAGE}._alembic"
ALEMBIC_INTERNALS = {"context_opts"}
"""Alembic attributes without an underscore that are still its internals to us."""
REPLACED = {"autocommit_block"}
"""Alembic methods we replace on an instance."""
_BY_NAME = {"getattr", "setattr", "hasattr", "delattr"}


def _own_module_names(module: Module) -> set[str]:
    """The names ``module`` binds to modules of the package (``from . import _x``)."""
    names = set()
    for node in _import_nodes(module.tree):
        for alias in node.names:
            if isinstance(node, ast.Import):
                if alias.name.split(".")[0] == PACKAGE:
                    names.add(alias.asname or alias.name.split(".")[0])
            elif node.level or (node.module or "").split(".")[0] == PACKAGE:
                names.add(alias.asname or alias.name)
    return {name for name in names if name.startswith("_")}


def private_uses(tree: ast.AST, own: Collection[str] = ()) -> Iterator[tuple[int, str]]:
    """(line, what) for each use of another library's private API: an underscore
    attribute of anything but ``self``, ``cls`` or a module of ours (``own``), the same
    by name (``getattr(x, "_y")``), ``context_opts``, and an assignment that replaces
    ``autocommit_block``."""
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute):
            if node.attr in ALEMBIC_INTERNALS:
                yield line, f".{node.attr}"
            elif node.attr.startswith("_") and not node.attr.startswith("__") and not (
                isinstance(node.value, ast.Name) and node.value.id in {"self", "cls", *own}
            ):
                yield line, f"{ast.unparse(node)}"
            if node.attr in REPLACED and isinstance(node.ctx, ast.Store):
                yield line, f"{ast.unparse(node)} = ..."
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _BY_NAME and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and (node.args[1].value.startswith("_")
                     or node.args[1].value in ALEMBIC_INTERNALS | REPLACED)):
            yield line, f"{node.func.id}(..., {node.args[1].value!r})"


def test_the_private_use_finder_finds_each_kind() -> None:
    source = (
        "script._upgrade_revs('head', heads)\n"
        "env = getattr(context, '_proxy', None)\n"
        "env.context_opts['fn'] = fn\n"
        "migration_context._transaction = connection.get_transaction()\n"
        "migration_context.autocommit_block = checked\n"
        "self.env._proxy\n"
    )
    found = [line for line, _ in private_uses(ast.parse(source))]
    assert sorted(set(found)) == [1, 2, 3, 4, 5, 6]
    allowed = "self._held\ncls._cache\n_diagnose._wrong_place(path)\nx.__name__\n"
    assert list(private_uses(ast.parse(allowed), {"_diagnose"})) == []


def test_the_alembic_shim_is_where_the_private_api_is_used() -> None:
    found = {what for _, what in private_uses(MODULES[ALEMBIC_SHIM].tree)}
    assert {"script._upgrade_revs", "script._downgrade_revs", "script._stamp_revs",
            "getattr(..., '_proxy')", ".context_opts",
            "migration_context._transaction"} <= found


@pytest.mark.parametrize(
    "module", [m for m in MODULES.values() if m.name != ALEMBIC_SHIM], ids=lambda m: m.name
)
def test_only_the_alembic_shim_touches_alembic_internals(module: Module) -> None:
    found = [f"{module.path.name}:{line}: {what}"
             for line, what in private_uses(module.tree, _own_module_names(module))]
    assert not found, (
        "Alembic's private API goes through a named function of _alembic.py (add one "
        "there), so that one file changes when Alembic does:\n" + "\n".join(found)
    )
