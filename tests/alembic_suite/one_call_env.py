"""Rewrite an env.py of Alembic's test suite into alembic_sqlite_lock's one-call form.

``to_one_call(source)`` keeps the env.py's imports, its other module-level code, its
``target_metadata`` and the keyword options it passes to ``context.configure()``, and
replaces its ``run_migrations_offline()`` / ``run_migrations_online()`` boilerplate with::

    from alembic_sqlite_lock import run_migrations
    run_migrations(context, target_metadata, **options)

Two forms, after what the env.py does with its database connection:

* It opens a plain connection from the ``[alembic]`` section's ``sqlalchemy.url``
  (Alembic's templates, most test fixtures): that is what ``run_migrations()`` does
  itself, so the engine, the connection and their clean-up go, and one call is left
  (at the place of the boilerplate, or at the end for the offline/online functions).
* It does more with its connection: begins a transaction of its own on it (an
  "external" transaction), or connects to other sections' databases (the ``multidb``
  template): that code stays, and each ``context.configure(connection=X, ...)`` plus
  ``context.run_migrations()`` becomes a connection handed in through
  ``config.attributes["connection"]`` (the library's documented way to run on your own
  connection) and a ``run_migrations()`` call.

``configure()`` keywords that ``run_migrations()`` sets itself are dropped: ``connection``
and ``url`` (what it runs on), ``literal_binds`` and ``dialect_opts`` (it renders
``--sql`` output with both). An env.py that never calls ``context.run_migrations()`` is
a probe of Alembic's API (``assert context.get_tag_argument() == 'x'``), not a migration
environment: there is no boilerplate to replace and it is left as written
(``to_one_call`` returns ``None``). Any other shape raises :class:`NoOneCallForm`, so
that nothing is silently left unconverted.

The module is used by ``one_call_plugin.py`` inside the unpacked Alembic sdist; it
imports nothing from Alembic or from the library.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

__all__ = ["LIBRARY_IMPORT", "NoOneCallForm", "to_one_call"]

LIBRARY_IMPORT = "from alembic_sqlite_lock import run_migrations"

SUPPLIED = frozenset({"connection", "url", "literal_binds", "dialect_opts"})
"""``configure()`` keywords that ``run_migrations()`` passes itself."""

COMPOUND = (ast.For, ast.With, ast.AsyncWith, ast.If, ast.FunctionDef, ast.AsyncFunctionDef)
"""Statements whose bodies are rewritten in place (the form that keeps its connection)."""

ENGINE_FACTORIES = frozenset({"engine_from_config", "async_engine_from_config", "create_engine"})


class NoOneCallForm(Exception):
    """The env.py has a shape this rewrite does not know: say so rather than guess."""


def to_one_call(source: str) -> tuple[str | None, list[str]]:
    """The one-call form of ``source`` (``None`` for an env.py that runs no migrations),
    and notes on what the form could not carry over."""
    tree = ast.parse(source)
    if not any(_context_call(node, "run_migrations") for node in ast.walk(tree)):
        return None, []
    rewrite = _Rewrite(source, tree)
    return rewrite.text(), rewrite.notes


# --- recognising Alembic's calls ----------------------------------------------------------


def _context_call(node: ast.AST, method: str) -> bool:
    """``context.<method>(...)``."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == method
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "context"
    )


def _expr_call(stmt: ast.stmt, method: str) -> ast.Call | None:
    """The ``context.<method>(...)`` call that ``stmt`` is, if it is one."""
    if isinstance(stmt, ast.Expr) and _context_call(stmt.value, method):
        assert isinstance(stmt.value, ast.Call)
        return stmt.value
    return None


def _is_begin_transaction(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.With) and all(
        _context_call(item.context_expr, "begin_transaction") and item.optional_vars is None
        for item in stmt.items
    )


def _is_boilerplate(node: ast.AST) -> bool:
    """Code that configures or runs Alembic's migration context."""
    return any(
        _context_call(inner, method)
        for inner in ast.walk(node)
        for method in ("configure", "run_migrations", "begin_transaction")
    )


def _called_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _is_main_section_engine(call: ast.AST) -> bool:
    """``engine_from_config(config.get_section(config.config_ini_section...), ...)``: the
    engine ``run_migrations()`` would make from the same section."""
    if _called_name(call) not in ENGINE_FACTORIES:
        return False
    assert isinstance(call, ast.Call)
    if not call.args:
        return False
    section = call.args[0]
    return (
        isinstance(section, ast.Call)
        and _called_name(section) == "get_section"
        and bool(section.args)
        and isinstance(section.args[0], ast.Attribute)
        and section.args[0].attr == "config_ini_section"
    )


def _method_on(node: ast.AST, names: Iterable[str], methods: Iterable[str]) -> bool:
    """``<name>.<method>(...)`` (awaited or not) for one of ``names`` and ``methods``."""
    if isinstance(node, ast.Await):
        node = node.value
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in set(methods)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in set(names)
    )


def _names(node: ast.AST) -> set[str]:
    return {inner.id for inner in ast.walk(node) if isinstance(inner, ast.Name)}


def _keywords(call: ast.Call) -> dict[str, ast.expr]:
    if call.args or any(keyword.arg is None for keyword in call.keywords):
        raise NoOneCallForm(f"configure() with positional or ** arguments: {ast.unparse(call)}")
    return {keyword.arg: keyword.value for keyword in call.keywords if keyword.arg is not None}


def _one_call(options: dict[str, ast.expr]) -> ast.Expr:
    """``run_migrations(context, <target_metadata>, **options)``, minus what it supplies."""
    options = dict(options)
    target = options.pop("target_metadata", ast.Constant(None))
    keywords = [
        ast.keyword(arg=name, value=value)
        for name, value in options.items()
        if name not in SUPPLIED
    ]
    call = ast.Call(
        func=ast.Name("run_migrations", ast.Load()),
        args=[ast.Name("context", ast.Load()), target],
        keywords=keywords,
    )
    return ast.Expr(call)


def _attributes() -> ast.expr:
    """``context.config.attributes`` (every env.py has ``context``; not all name ``config``)."""
    return ast.parse("context.config.attributes", mode="eval").body


def _handed_in(connection: ast.expr, call: ast.Expr) -> list[ast.stmt]:
    """The connection handed in for this one call, and taken back after it: the Config
    outlives the env.py, and a later command must not find a closed connection there."""
    hand_in = ast.Assign(
        targets=[ast.Subscript(_attributes(), ast.Constant("connection"), ast.Store())],
        value=connection,
        lineno=0,
    )
    take_back = ast.Expr(
        ast.Call(
            func=ast.Attribute(_attributes(), "pop", ast.Load()),
            args=[ast.Constant("connection"), ast.Constant(None)],
            keywords=[],
        )
    )
    return [hand_in, ast.Try(body=[call], handlers=[], orelse=[], finalbody=[take_back])]


# --- the rewrite ------------------------------------------------------------------------


class _Rewrite:
    def __init__(self, source: str, tree: ast.Module) -> None:
        self.lines = source.splitlines(keepends=True)
        self.tree = tree
        self.functions = {
            node.name: node
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        self.boilerplate = self._boilerplate_functions()
        self.keep_connection = self._keeps_connection()
        # Plain engines and connections from the [alembic] section, dropped in the
        # simple form (run_migrations() makes its own).
        self.engines: set[str] = set()
        self.connections: set[str] = set()
        self.pending: ast.Call | None = None
        """The configure() call that the next context.run_migrations() runs with."""
        self.notes: list[str] = []
        """What the one-call form cannot carry over (for the run's report)."""

    # -- analysis

    def _boilerplate_functions(self) -> set[str]:
        """Functions that configure or run the context, and those that call them
        (``run_migrations_online`` -> ``asyncio.run(run_async_migrations())`` ->
        ``connection.run_sync(do_run_migrations)``)."""
        found = {name for name, node in self.functions.items() if _is_boilerplate(node)}
        while True:
            more = {
                name
                for name, node in self.functions.items()
                if name not in found and _names(node) & found
            }
            if not more:
                return found
            found |= more

    def _keeps_connection(self) -> bool:
        """Does the env.py do more with its connection than run_migrations() would?"""
        for node in ast.walk(self.tree):
            # A transaction of its own on the connection (not Alembic's begin_transaction).
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"begin", "begin_twophase"}
            ):
                return True
            # Migrations per database, in a loop over sections.
            if isinstance(node, ast.For) and _is_boilerplate(node):
                return True
            # An engine from another section than [alembic].
            if _called_name(node) in ENGINE_FACTORIES and not _is_main_section_engine(node):
                return True
        return False

    # -- output

    def text(self) -> str:
        body = self.tree.body
        dispatch = [stmt for stmt in body if self._is_dispatch(stmt)]
        if dispatch and not self.keep_connection:
            new = self._functions_to_one_call(body, dispatch)
        else:
            new = [self._statement(stmt) for stmt in body]
        if self.pending is not None:
            raise NoOneCallForm(f"configure() without a run: {ast.unparse(self.pending)}")
        return self._render(body, new)

    def _render(self, old: list[ast.stmt], new: list[list[ast.stmt] | None]) -> str:
        """Untouched statements verbatim (comments and all), changed ones unparsed, and
        the library's import after the leading imports."""
        out: list[str] = []
        position = 0  # the next line of the source not yet copied
        imported = False
        for stmt, replacement in zip(old, new, strict=True):
            decorators = getattr(stmt, "decorator_list", [])
            start = min([stmt.lineno] + [node.lineno for node in decorators]) - 1
            end = stmt.end_lineno or stmt.lineno
            if not imported and not isinstance(stmt, ast.Import | ast.ImportFrom):
                out.append(f"{LIBRARY_IMPORT}\n")
                imported = True
            out.extend(self.lines[position:start])  # comments and blank lines before it
            if replacement is None:
                out.extend(self.lines[start:end])
            else:
                out.extend(f"{ast.unparse(node)}\n" for node in replacement)
            position = end
        out.extend(self.lines[position:])
        if not imported:
            out.append(f"{LIBRARY_IMPORT}\n")
        return "".join(out)

    # -- the offline/online functions of Alembic's templates

    def _is_dispatch(self, stmt: ast.stmt) -> bool:
        """``if context.is_offline_mode(): run_migrations_offline() else: ...online()``, or
        a bare ``run_migrations_online()``."""
        if isinstance(stmt, ast.If) and _context_call(stmt.test, "is_offline_mode"):
            return all(self._is_dispatch(inner) for inner in stmt.body + stmt.orelse)
        return isinstance(stmt, ast.Expr) and _called_name(stmt.value) in self.boilerplate

    def _functions_to_one_call(
        self, body: list[ast.stmt], dispatch: list[ast.stmt]
    ) -> list[list[ast.stmt] | None]:
        """The boilerplate functions and the dispatch give way to one call, in the
        dispatch's place, with the options of the offline and the online configure()
        (online's win where both give one)."""
        offline: dict[str, ast.expr] = {}
        online: dict[str, ast.expr] = {}
        local: set[str] = set()
        for name in self.boilerplate:
            function = self.functions[name]
            local |= {arg.arg for arg in function.args.args}
            local |= {
                inner.id
                for inner in ast.walk(function)
                if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store)
            }
            self._check_only_boilerplate(function.body, name)
            for node in ast.walk(function):
                if _context_call(node, "configure"):
                    assert isinstance(node, ast.Call)
                    into = offline if "offline" in name else online
                    into.update(_keywords(node))
        options = {**offline, **online}
        used = set().union(
            *(_names(value) for name, value in options.items() if name not in SUPPLIED)
        )
        if used & local:
            raise NoOneCallForm(f"configure() options use the functions' own names {used & local}")
        new: list[list[ast.stmt] | None] = []
        for stmt in body:
            if stmt is dispatch[-1]:
                new.append([_one_call(options)])
            elif stmt in dispatch or (
                isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef)
                and stmt.name in self.boilerplate
            ):
                new.append([])
            elif _is_boilerplate(stmt):
                raise NoOneCallForm(f"boilerplate outside the functions: {ast.unparse(stmt)}")
            else:
                new.append(None)
        return new

    def _check_only_boilerplate(self, stmts: list[ast.stmt], function: str) -> None:
        """The functions must hold nothing but boilerplate, or dropping them loses code."""
        engines: set[str] = set()
        for stmt in stmts:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # docstring
            if _expr_call(stmt, "configure") or _expr_call(stmt, "run_migrations"):
                continue
            if _is_begin_transaction(stmt):
                assert isinstance(stmt, ast.With)
                self._check_only_boilerplate(stmt.body, function)
                continue
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target, value = stmt.targets[0], stmt.value
                if isinstance(target, ast.Name) and _is_main_section_engine(value):
                    engines.add(target.id)
                    continue
                # offline: url = config.get_main_option("sqlalchemy.url"), run_migrations()'s own
                if isinstance(target, ast.Name) and target.id == "url":
                    continue
            if isinstance(stmt, ast.With | ast.AsyncWith) and all(
                _method_on(item.context_expr, engines, {"connect"}) for item in stmt.items
            ):
                self._check_only_boilerplate(stmt.body, function)
                continue
            if isinstance(stmt, ast.Expr) and _method_on(stmt.value, engines, {"dispose"}):
                continue
            if isinstance(stmt, ast.Expr) and (
                _names(stmt.value) & self.boilerplate
            ):  # asyncio.run(run_async_migrations()), connection.run_sync(do_run_migrations)
                continue
            raise NoOneCallForm(f"{function}() does more than the boilerplate: {ast.unparse(stmt)}")

    # -- statement by statement: env.py files written as a script, and those that keep
    # their connection

    def _statement(self, stmt: ast.stmt) -> list[ast.stmt] | None:
        """``None`` when the statement stays as written."""
        if not _is_boilerplate(stmt) and not self._is_plain_plumbing(stmt):
            return None
        return self._block([stmt])

    def _is_plain_plumbing(self, stmt: ast.stmt) -> bool:
        """An engine or connection from [alembic], or its clean-up (simple form only)."""
        if self.keep_connection:
            return False
        if isinstance(stmt, ast.Assign) and _is_main_section_engine(stmt.value):
            return True
        if isinstance(stmt, ast.Assign) and _method_on(stmt.value, self.engines, {"connect"}):
            return True
        return isinstance(stmt, ast.Expr) and _method_on(
            stmt.value, self.engines | self.connections, {"close", "dispose"}
        )

    def _block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        """The statements in order of execution: a configure() is dropped and its options
        go to the run_migrations() that follows it (in the same block or a later one: a
        script env.py configures at the top and runs inside ``try``)."""
        out: list[ast.stmt] = []
        for stmt in stmts:
            if configure := _expr_call(stmt, "configure"):
                self.pending = configure
            elif run := _expr_call(stmt, "run_migrations"):
                if self.pending is None:
                    raise NoOneCallForm("context.run_migrations() without configure() before it")
                out.extend(self._run(self.pending, run))
                self.pending = None
            elif _is_begin_transaction(stmt):
                assert isinstance(stmt, ast.With)
                out.extend(self._block(stmt.body))
            else:
                out.extend(self._other(stmt))
        return out

    def _other(self, stmt: ast.stmt) -> list[ast.stmt]:
        if not self.keep_connection and (dropped := self._plumbing(stmt)) is not None:
            return dropped
        if not _is_boilerplate(stmt):
            return [stmt]
        if isinstance(stmt, ast.Try):
            body = self._block(stmt.body)
            finalbody = [new for old in stmt.finalbody for new in self._other(old)]
            if not finalbody and not stmt.handlers and not stmt.orelse:
                return body
            orelse = [new for old in stmt.orelse for new in self._other(old)]
            return [ast.Try(body=body, handlers=stmt.handlers, orelse=orelse, finalbody=finalbody)]
        if isinstance(stmt, COMPOUND):
            copy = _shallow_copy(stmt)
            copy.body = self._block(stmt.body)  # type: ignore[attr-defined]
            if isinstance(stmt, ast.For | ast.If):
                copy.orelse = self._block(stmt.orelse)  # type: ignore[attr-defined]
            return [copy]
        raise NoOneCallForm(f"a statement this rewrite does not know: {ast.unparse(stmt)}")

    def _plumbing(self, stmt: ast.stmt) -> list[ast.stmt] | None:
        """Simple form: an engine or a plain connection from [alembic] goes (with its
        clean-up); ``with engine.connect() as connection:`` leaves its body. ``None``
        for any other statement."""
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if isinstance(target, ast.Name) and _is_main_section_engine(stmt.value):
                self.engines.add(target.id)
                return []
            if isinstance(target, ast.Name) and _method_on(stmt.value, self.engines, {"connect"}):
                self.connections.add(target.id)
                return []
        if isinstance(stmt, ast.Expr) and _method_on(
            stmt.value, self.engines | self.connections, {"close", "dispose"}
        ):
            return []
        if isinstance(stmt, ast.With | ast.AsyncWith) and all(
            _method_on(item.context_expr, self.engines, {"connect"})
            and isinstance(item.optional_vars, ast.Name)
            for item in stmt.items
        ):
            self.connections |= {
                item.optional_vars.id
                for item in stmt.items
                if isinstance(item.optional_vars, ast.Name)
            }
            return self._block(stmt.body)
        return None

    def _run(self, configure: ast.Call, run: ast.Call) -> list[ast.stmt]:
        options = _keywords(configure)
        if run.args or run.keywords:
            # The multidb template's context.run_migrations(engine_name=name), which Alembic
            # passes on to the revisions' upgrade(engine_name): the library's
            # run_migrations() has no such arguments. Alembic's suite runs that template
            # only through autogenerate and check, which never call upgrade().
            self.notes.append(f"dropped context.run_migrations() arguments: {ast.unparse(run)}")
        connection = options.get("connection")
        call = _one_call(options)
        if connection is None:  # offline
            return [call]
        if isinstance(connection, ast.Name) and connection.id in self.connections:
            return [call]  # dropped: run_migrations() connects to the same URL itself
        if not self.keep_connection:
            raise NoOneCallForm(f"a connection of unknown origin: {ast.unparse(connection)}")
        return _handed_in(connection, call)


def _shallow_copy(node: ast.AST) -> ast.AST:
    copy = type(node)()
    for name, value in ast.iter_fields(node):
        setattr(copy, name, value)
    for name in ("lineno", "col_offset", "end_lineno", "end_col_offset"):
        if hasattr(node, name):
            setattr(copy, name, getattr(node, name))
    return copy

