"""The errors: one family under alembic's CommandError, and intact across processes.

A worker pool or a process supervisor gets an error from a child through pickle; the
type, the message and the facts it carries (url, attempts, waited_s, holder, revision)
must arrive as they left. The round trips below go through a real child process.

Each condition has its own class, built where it is raised: every class of _errors.py
is exported and in the reference's Errors table, and no module raises the bare base.
"""

from __future__ import annotations

import ast
import inspect
import multiprocessing
import queue
import re
from pathlib import Path
from typing import Any

import pytest
from alembic.util import CommandError
from conftest import REPO

import alembic_sqlite_lock
from alembic_sqlite_lock import (
    ConfigurationError,
    DatabaseUnreadable,
    LockLost,
    LockNotTaken,
    LockTimeout,
    MigrationError,
    MigrationLockError,
    RollbackFailed,
    _errors,
)
from alembic_sqlite_lock._errors import lock_timeout

URL = "sqlite:////srv/app/app.db"
SERVER_URL = "mysql+pymysql://app:***@db/app"
FIELDS = ("url", "attempts", "waited_s", "holder", "revision", "lock_name")

# spawn, not fork: the child starts from nothing and must rebuild every error from the
# pickle alone, as a process on another interpreter would.
SPAWN = multiprocessing.get_context("spawn")


def sample_errors() -> list[MigrationLockError]:
    """One of each, with every field set to something other than its default."""
    return [
        MigrationLockError("generic failure on " + URL),
        ConfigurationError("Setting deadline_s must be a finite number of seconds > 0."),
        LockTimeout("could not lock", url=URL, attempts=7, waited_s=61.25, holder="pid 4242"),
        lock_timeout(URL, 10, 103.5),
        DatabaseUnreadable("could not read the migration state", url=SERVER_URL),
        LockNotTaken("GET_LOCK returned NULL", url=SERVER_URL, lock_name="alembic.app"),
        LockLost("the lock was lost", url=SERVER_URL, lock_name="alembic.app"),
        MigrationError("0009 failed", url=URL, revision="0009"),
        MigrationError("run failed before commit", url=URL),
        RollbackFailed("rollback failed too", url=URL, revision="0006"),
    ]


def raise_and_catch(error: MigrationLockError) -> MigrationLockError:
    """The error as a worker holds it: raised, with a cause and a traceback."""
    try:
        try:
            raise OSError("disk I/O error")
        except OSError as cause:
            raise error from cause
    except MigrationLockError as caught:
        return caught


def child(inbox: Any, outbox: Any) -> None:
    """Send back what the parent sent, then errors raised here in the child."""
    outbox.put(("echo", inbox.get(timeout=60)))
    outbox.put(("raised", [raise_and_catch(error) for error in sample_errors()]))


def facts(error: BaseException) -> tuple[Any, ...]:
    return (
        type(error),
        str(error),
        error.args,
        tuple(getattr(error, name, "<absent>") for name in FIELDS),
    )


@pytest.fixture(scope="module")
def through_a_process() -> dict[str, list[BaseException]]:
    inbox, outbox = SPAWN.Queue(), SPAWN.Queue()
    process = SPAWN.Process(target=child, args=(inbox, outbox))
    process.start()
    try:
        inbox.put([raise_and_catch(error) for error in sample_errors()])
        received = dict(outbox.get(timeout=60) for _ in range(2))
        process.join(timeout=60)
    except queue.Empty:
        pytest.fail(f"the child process sent nothing back (exit code {process.exitcode})")
    finally:
        if process.is_alive():
            process.kill()
            process.join()
    assert process.exitcode == 0
    return received


def error_classes() -> list[type[MigrationLockError]]:
    """Every error class _errors.py defines."""
    return [cls for _, cls in inspect.getmembers(_errors, inspect.isclass)
            if issubclass(cls, MigrationLockError) and cls.__module__ == _errors.__name__]


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_is_a_command_error_and_a_migration_lock_error(cls: type) -> None:
    assert issubclass(cls, CommandError)
    assert issubclass(cls, MigrationLockError)


def documented_errors() -> set[str]:
    """The names in the first column of the reference's Errors table."""
    text = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)`", section, flags=re.MULTILINE))


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_is_exported_and_documented(cls: type) -> None:
    assert cls.__name__ in alembic_sqlite_lock.__all__
    assert getattr(alembic_sqlite_lock, cls.__name__) is cls
    assert cls.__doc__, f"{cls.__name__} has no docstring"
    assert cls.__name__ in documented_errors(), (
        f"{cls.__name__} is not in the Errors table of docs/reference.md"
    )


def test_the_errors_table_names_only_real_classes() -> None:
    assert documented_errors() == {cls.__name__ for cls in error_classes()}


def bare_base_errors(tree: ast.AST) -> list[int]:
    """The lines that build a ``MigrationLockError`` itself (not a subclass)."""
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == "MigrationLockError")
        or (isinstance(node.func, ast.Attribute) and node.func.attr == "MigrationLockError")
    )]


def test_the_bare_base_finder_finds_both_spellings() -> None:
    source = "raise MigrationLockError(msg)\nreturn _errors.MigrationLockError(msg)\n"
    assert bare_base_errors(ast.parse(source)) == [1, 2]


def test_no_module_raises_the_bare_base_class() -> None:
    root = Path(alembic_sqlite_lock.__file__).parent
    found = [
        f"{path.relative_to(root)}:{line}"
        for path in sorted(root.rglob("*.py"))
        for line in bare_base_errors(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not found, (
        "Each condition gets its own subclass of MigrationLockError in _errors.py "
        "(exported, in docs/reference.md's Errors table):\n" + "\n".join(found)
    )


def test_the_new_errors_carry_their_facts() -> None:
    lost = LockLost("lost", url=SERVER_URL, lock_name="alembic.app")
    assert (str(lost), lost.url, lost.lock_name) == ("lost", SERVER_URL, "alembic.app")
    unreadable = DatabaseUnreadable("unreadable", url=SERVER_URL)
    assert (str(unreadable), unreadable.url) == ("unreadable", SERVER_URL)


def test_rollback_failed_is_a_migration_error() -> None:
    assert issubclass(RollbackFailed, MigrationError)


def test_errors_carry_their_facts_as_attributes() -> None:
    timeout = lock_timeout(URL, 10, 103.5)

    assert (timeout.url, timeout.attempts, timeout.waited_s, timeout.holder) == (
        URL, 10, 103.5, None)
    assert "after 10 attempts over 103.5s" in str(timeout)
    error = MigrationError("boom", url=URL, revision="0009")
    assert (str(error), error.url, error.revision) == ("boom", URL, "0009")
    assert MigrationError("boom", url=URL).revision is None


def test_errors_sent_to_a_child_process_come_back_intact(
    through_a_process: dict[str, list[BaseException]],
) -> None:
    echoed = through_a_process["echo"]

    assert [facts(e) for e in echoed] == [facts(e) for e in sample_errors()]


def test_errors_raised_in_a_child_process_arrive_intact(
    through_a_process: dict[str, list[BaseException]],
) -> None:
    raised = through_a_process["raised"]

    assert [facts(e) for e in raised] == [facts(e) for e in sample_errors()]
    timeout = raised[2]
    assert isinstance(timeout, LockTimeout)
    assert (timeout.url, timeout.attempts, timeout.waited_s, timeout.holder) == (
        URL, 7, 61.25, "pid 4242")
    rollback = raised[-1]
    assert isinstance(rollback, RollbackFailed)
    assert isinstance(rollback, MigrationError)
    assert (rollback.url, rollback.revision) == (URL, "0006")


def test_errors_from_a_child_process_can_be_raised_and_caught_by_type(
    through_a_process: dict[str, list[BaseException]],
) -> None:
    for error in through_a_process["raised"]:
        with pytest.raises(CommandError) as caught:
            raise error
        assert caught.value is error
