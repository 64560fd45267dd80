"""The demo chain itself: 0001..0008 up, down and up again, online and offline.

One real `alembic` process per command on a copy of the demo project; the facts are
read back from the SQLite file with plain sqlite3.
"""

from __future__ import annotations

import subprocess
from itertools import pairwise

from alembic.config import Config
from alembic.script import ScriptDirectory
from conftest import DEMO_REVISIONS, Project

TABLES = {"users", "posts", "tags", "post_tags", "data_migrations"}


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def upgrade_head(project: Project) -> None:
    result = project.alembic("upgrade", "head")
    assert result.returncode == 0, output(result)


def schema_objects(project: Project, kind: str) -> set[str]:
    return {str(name) for (name,) in project.query(
        f"SELECT name FROM sqlite_master WHERE type = '{kind}' AND name NOT LIKE 'sqlite_%'")}


def assert_at_head(project: Project) -> None:
    assert project.version() == ["0008"]
    assert schema_objects(project, "table") == TABLES | {"alembic_version"}
    assert schema_objects(project, "view") == {"post_summaries"}
    assert "ix_posts_author_created" in schema_objects(project, "index")
    assert project.count("tags") == 3
    assert project.count("data_migrations") == 1


def test_upgrade_head_builds_the_whole_schema(project: Project) -> None:
    upgrade_head(project)

    assert_at_head(project)
    assert sorted(str(n) for (n,) in project.query("SELECT name FROM tags")) == [
        "howto", "news", "release"]
    assert project.query("SELECT revision FROM data_migrations") == [("0005",)]
    # PRAGMA table_info: (cid, name, type, notnull, default, pk)
    columns = {row[1]: row for row in project.query("PRAGMA table_info(posts)")}
    assert columns["title"][2] == "VARCHAR(300)"
    assert columns["title"][3] == 1  # NOT NULL, after the batch rebuild of 0006
    index_columns = [row[2] for row in project.query(
        "PRAGMA index_info(ix_posts_author_created)")]
    assert index_columns == ["author_id", "created_at"]
    assert "display_name" in {row[1] for row in project.query("PRAGMA table_info(users)")}
    assert project.query("SELECT post_id, title, author FROM post_summaries") == []
    assert project.query("PRAGMA foreign_key_check") == []


def test_upgrade_head_at_head_changes_nothing(project: Project) -> None:
    upgrade_head(project)

    again = project.alembic("upgrade", "head")

    assert again.returncode == 0, output(again)
    assert "Database already at 0008, nothing to do" in again.stderr
    assert "Applying migration" not in again.stderr
    assert_at_head(project)  # 0005's data migration did not run twice


def test_downgrade_to_base_and_upgrade_again(project: Project) -> None:
    upgrade_head(project)

    down = project.alembic("downgrade", "base")

    assert down.returncode == 0, output(down)
    assert project.tables() == {"alembic_version"}
    assert project.count("alembic_version") == 0
    assert schema_objects(project, "index") == set()

    upgrade_head(project)

    assert_at_head(project)


def test_offline_upgrade_renders_sql_and_touches_no_database(project: Project) -> None:
    result = project.alembic("upgrade", "head", "--sql")

    assert result.returncode == 0, output(result)
    sql = result.stdout
    assert "CREATE TABLE users" in sql
    assert "CREATE VIEW post_summaries" in sql
    assert "CREATE TABLE _alembic_tmp_posts" in sql  # 0006's batch copy
    assert "ALTER TABLE _alembic_tmp_posts RENAME TO posts" in sql
    assert "INSERT INTO tags" in sql
    assert "UPDATE alembic_version SET version_num='0008'" in sql
    assert not project.db.exists()
    assert list(project.root.glob("app.db*")) == []


def test_the_chain_is_one_line_of_at_least_eight_revisions(project: Project) -> None:
    script = ScriptDirectory.from_config(Config(str(project.ini)))

    assert script.get_heads() == ["0008"]
    assert script.get_bases() == ["0001"]
    walked = list(script.walk_revisions("base", "heads"))  # head first
    assert len(walked) >= 8
    assert [rev.revision for rev in reversed(walked)] == DEMO_REVISIONS
    for older, newer in pairwise(reversed(walked)):
        assert newer.down_revision == older.revision
        assert not older.is_merge_point
        assert not older.is_branch_point
    assert walked[-1].down_revision is None
