"""Async apps: sqlite+aiosqlite:// URLs, and upgrade_async() from inside a running loop."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from conftest import DEMO_REVISIONS, Project, run_together
from sqlalchemy.ext.asyncio import create_async_engine

import alembic_sqlite_lock
from alembic_sqlite_lock import ConfigurationError, MigrationError, upgrade_async

SYNC_URL_LINE = "sqlalchemy.url = sqlite:///%(here)s/app.db"
ASYNC_URL_LINE = "sqlalchemy.url = sqlite+aiosqlite:///%(here)s/app.db"


@pytest.fixture
def async_project(project: Project) -> Project:
    """The demo project with the URL an async app would have in its alembic.ini."""
    text = project.ini.read_text()
    assert SYNC_URL_LINE in text
    project.ini.write_text(text.replace(SYNC_URL_LINE, ASYNC_URL_LINE))
    return project


def assert_migrated_once(project: Project, head: str = "0008") -> None:
    assert project.version() == [head]
    assert project.count("data_migrations") == 1
    assert project.count("tags") == 3


async def heads_seen_by_aiosqlite(db: Path) -> list[str]:
    """What the app's own async engine reads from the file the library migrated."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    try:
        async with engine.connect() as connection:
            heads = await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_heads()
            )
    finally:
        await engine.dispose()
    return sorted(heads)


# sqlite+aiosqlite:// in alembic.ini ---------------------------------------------------------


def test_aiosqlite_url_with_the_cli_from_four_workers_at_once(async_project: Project) -> None:
    """run_migrations() migrates the aiosqlite URL's file through pysqlite, under the same
    lock: four `alembic upgrade head` at one instant still apply each revision once."""
    results = run_together(
        [["alembic", "-c", str(async_project.ini), "upgrade", "head"]] * 4,
        cwd=async_project.root,
    )
    for result in results:
        assert result.returncode == 0, result.stderr
    applied = Counter(
        rev for r in results for rev in re.findall(r"Applied migration: (\w+)", r.stderr)
    )
    assert applied == Counter(DEMO_REVISIONS)
    assert_migrated_once(async_project)
    current = async_project.alembic("current")
    assert current.returncode == 0, current.stderr
    assert "0008 (head)" in current.stdout


def test_aiosqlite_url_with_upgrade(async_project: Project) -> None:
    assert alembic_sqlite_lock.upgrade(async_project.ini) == DEMO_REVISIONS
    assert alembic_sqlite_lock.upgrade(async_project.ini) == []
    assert_migrated_once(async_project)
    assert asyncio.run(heads_seen_by_aiosqlite(async_project.db)) == ["0008"]


# upgrade_async() ---------------------------------------------------------------------------


def test_upgrade_async_inside_a_running_loop(async_project: Project) -> None:
    """Awaited from a coroutine, as a lifespan handler does: no asyncio.run() inside."""

    async def lifespan() -> tuple[list[str], list[str], list[str]]:
        first = await upgrade_async(async_project.ini)
        again = await upgrade_async(Config(str(async_project.ini)))
        return first, again, await heads_seen_by_aiosqlite(async_project.db)

    first, again, heads = asyncio.run(lifespan())
    assert first == DEMO_REVISIONS
    assert again == []
    assert heads == ["0008"]
    assert_migrated_once(async_project)


def test_upgrade_async_passes_settings_and_revision(project: Project) -> None:
    async def main() -> list[str]:
        return await upgrade_async(project.ini, "0004", deadline_s=30, max_attempts=3)

    assert asyncio.run(main()) == ["0001", "0002", "0003", "0004"]
    assert project.version() == ["0004"]
    with pytest.raises(ConfigurationError, match="max_attempts"):
        asyncio.run(upgrade_async(project.ini, max_attempts=0))
    assert project.version() == ["0004"]


def test_concurrent_upgrade_async_tasks_apply_each_migration_once(project: Project) -> None:
    """Tasks of one loop run in threads of one process: the process mutex serializes them."""

    async def main() -> list[list[str]]:
        return list(await asyncio.gather(*(upgrade_async(project.ini) for _ in range(4))))

    applied = asyncio.run(main())
    assert sorted(len(revs) for revs in applied) == [0, 0, 0, 8]
    assert_migrated_once(project)


def add_gated_revision(project: Project, gate: Path, wait_s: float) -> None:
    """0009 signals that it runs, then waits until the test's event loop opens the gate.
    If the loop were blocked, the gate never opens and 0009 fails after ``wait_s``."""
    project.add_revision(
        "0009", "0008",
        f"""\
started, release = Path({str(gate / "started")!r}), Path({str(gate / "release")!r})
started.touch()
deadline = time.monotonic() + {wait_s}
while not release.exists():
    if time.monotonic() > deadline:
        raise RuntimeError("the event loop never opened the gate")
    time.sleep(0.01)
""",
        header="import time\nfrom pathlib import Path",
    )


async def tick_while_migrating(gate: Path, ticks: list[int], migration: asyncio.Future[object]
                               ) -> None:
    """The app's other work: once 0009 runs, tick five times, then open the gate."""
    while not (gate / "started").exists() and not migration.done():
        await asyncio.sleep(0.01)
    for n in range(5):
        if migration.done():
            return
        ticks.append(n)
        await asyncio.sleep(0.01)
    (gate / "release").touch()


def test_event_loop_keeps_running_while_upgrade_async_migrates(
    project: Project, tmp_path: Path
) -> None:
    add_gated_revision(project, tmp_path, wait_s=60)
    ticks: list[int] = []

    async def main() -> list[str]:
        migration = asyncio.ensure_future(upgrade_async(project.ini))
        await tick_while_migrating(tmp_path, ticks, migration)
        return await migration

    assert asyncio.run(main()) == [*DEMO_REVISIONS, "0009"]
    assert ticks == [0, 1, 2, 3, 4]  # all while 0009 was running
    assert project.version() == ["0009"]


def test_control_sync_upgrade_in_a_coroutine_blocks_the_loop(
    project: Project, tmp_path: Path
) -> None:
    """The same check catches a blocking call: the ticker never runs, 0009 gives up."""
    add_gated_revision(project, tmp_path, wait_s=1)
    ticks: list[int] = []

    async def blocking() -> list[str]:
        return alembic_sqlite_lock.upgrade(project.ini)

    async def main() -> None:
        migration = asyncio.ensure_future(blocking())
        await tick_while_migrating(tmp_path, ticks, migration)
        await migration

    with pytest.raises(MigrationError, match="never opened the gate"):
        asyncio.run(main())
    assert ticks == []
    assert project.version() == []  # the whole run was rolled back


# A connection handed in by an async app -----------------------------------------------------


def test_handed_in_aiosqlite_connection_is_refused_clearly(project: Project) -> None:
    """Alembic's async cookbook hands in ``AsyncConnection.run_sync``'s connection. The
    library migrates through pysqlite; an aiosqlite connection must be refused with a
    ConfigurationError that says so (or be migrated), never an AssertionError."""
    config = Config(str(project.ini))

    def migrate(sync_connection: object) -> list[str]:
        config.attributes["connection"] = sync_connection
        return alembic_sqlite_lock.upgrade(config)

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{project.db}")
        try:
            async with engine.connect() as connection:
                await connection.run_sync(migrate)
        finally:
            await engine.dispose()

    with pytest.raises(ConfigurationError, match="aiosqlite"):
        asyncio.run(main())
