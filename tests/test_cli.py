"""The alembic-sqlite-lock command line: init, upgrade/downgrade/stamp/current, exit codes."""

from __future__ import annotations

import configparser
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import DEMO_REVISIONS, REPO, Project, held_flock, run_together

from alembic_sqlite_lock._backends._sqlite._runlock import SUFFIX
from alembic_sqlite_lock._cli import _main as _cli
from alembic_sqlite_lock._settings import NAMES

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))
COMMANDS = ["init", "upgrade", "downgrade", "stamp", "current", "status"]


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def init_project(root: Path) -> Project:
    """`alembic-sqlite-lock init migrations` in ``root``, plus the demo revisions."""
    root.mkdir(parents=True, exist_ok=True)
    result = cli("init", "migrations", cwd=root)
    assert result.returncode == 0, result.stderr
    for revision in (REPO / "alembic" / "versions").glob("0*.py"):
        shutil.copy(revision, root / "migrations" / "versions")
    return InitProject(root)


class InitProject(Project):
    @property
    def env_py(self) -> Path:
        return self.root / "migrations" / "env.py"

    @property
    def versions(self) -> Path:
        return self.root / "migrations" / "versions"




def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr


# --help -----------------------------------------------------------------------------

def test_help_of_the_tool_lists_commands_and_exit_codes(tmp_path: Path) -> None:
    for argv in ([CLI, "--help"], [sys.executable, "-m", "alembic_sqlite_lock", "--help"]):
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: alembic-sqlite-lock")
        for command in COMMANDS:
            assert command in result.stdout
        assert "exit codes:" in result.stdout
        assert "3  the migration lock was not free in time" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(tmp_path: Path, command: str) -> None:
    result = cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: alembic-sqlite-lock {command}")
    assert "exit codes:" in result.stdout
    if command != "init":
        assert "-c CONFIG, --config CONFIG" in result.stdout
        assert "-x KEY=VALUE" in result.stdout
        for name in NAMES:  # settings as flags, same names
            assert f"--{name}" in result.stdout
    if command in ("upgrade", "downgrade", "stamp"):
        assert "--sql" in result.stdout
    if command == "status":
        assert "--json" in result.stdout


# init -------------------------------------------------------------------------------

def test_init_writes_an_environment_like_alembic_init(tmp_path: Path) -> None:
    result = cli("init", "migrations", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    env = tmp_path / "migrations"
    assert (env / "versions").is_dir()
    assert list((env / "versions").iterdir()) == []
    assert "run_migrations(context, target_metadata)" in (env / "env.py").read_text()
    assert "${up_revision}" in (env / "script.py.mako").read_text()
    ini = (tmp_path / "alembic.ini").read_text()
    assert "script_location = %(here)s/migrations\n" in ini
    assert "sqlalchemy.url = sqlite:///%(here)s/app.db\n" in ini
    section = ini.split("[alembic_sqlite_lock]", 1)[1].split("\n[", 1)[0]
    for name, default in {"max_attempts": "10", "base_delay_s": "0.1", "jitter_s": "0.1",
                          "busy_timeout_s": "30", "deadline_s": "120"}.items():
        assert f"# {name} = {default}\n" in section
    for name in NAMES:  # every setting, commented out
        assert f"# {name} =" in section
    assert re.search(r"^\w+ *=", section, re.MULTILINE) is None  # nothing set
    assert "qualname = alembic_sqlite_lock" in ini
    assert "Next: edit sqlalchemy.url in alembic.ini, write a migration" in result.stdout


def test_init_refuses_a_non_empty_directory_and_an_existing_ini(tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "keep.txt").write_text("mine")
    result = cli("init", "migrations", cwd=tmp_path)
    assert result.returncode == _cli.EXIT_USAGE
    assert "already exists and is not empty" in result.stderr
    assert_no_traceback(result)
    assert sorted(p.name for p in (tmp_path / "migrations").iterdir()) == ["keep.txt"]
    assert not (tmp_path / "alembic.ini").exists()

    (tmp_path / "alembic.ini").write_text("[alembic]\n")
    result = cli("init", "fresh", cwd=tmp_path)
    assert result.returncode == _cli.EXIT_USAGE
    assert "alembic.ini already exists" in result.stderr
    assert not (tmp_path / "fresh").exists()
    assert (tmp_path / "alembic.ini").read_text() == "[alembic]\n"


def test_init_into_an_empty_directory_with_another_ini_path(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    result = cli("init", "db", "-c", "conf/migrate.ini", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ini = (tmp_path / "conf" / "migrate.ini").read_text()
    assert f"script_location = {tmp_path / 'db'}\n" in ini  # not under the ini's folder


def test_init_writes_percent_signs_of_a_path_or_url_literally(tmp_path: Path) -> None:
    """configparser reads a lone % as interpolation: init writes it as %%, and keeps
    %(here)s, the one interpolation a URL in alembic.ini is meant to use."""
    result = cli("init", "db%c", "-c", "my.ini", "--url", "sqlite:///%(here)s/50%off.db",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ini = (tmp_path / "my.ini").read_text()
    assert "script_location = %(here)s/db%%c\n" in ini
    assert "sqlalchemy.url = sqlite:///%(here)s/50%%off.db\n" in ini
    upgrade = cli("-c", "my.ini", "upgrade", cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    assert (tmp_path / "50%off.db").exists()


def test_init_next_hint_quotes_a_path_with_spaces(tmp_path: Path) -> None:
    result = cli("init", "db", "-c", "my conf.ini", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "`alembic-sqlite-lock -c 'my conf.ini' upgrade`" in result.stdout


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sqlalchemy.url = sqlite:///app.db\n", "File contains no section headers"),
        ("[alembic]\nscript_location = migrations\nsqlalchemy.url = sqlite:///50%off.db\n",
         "'%' must be followed by '%' or '('"),
        ("[alembic_sqlite_lock]\ndeadline_s = 5%\n[alembic]\nscript_location = m\n",
         "'%' must be followed by '%' or '('"),
        ("[alembic]\nsqlalchemy.url = sqlite:///app.db\n",
         "has no script_location in its [alembic]"),
    ],
    ids=["no section", "lone percent", "lone percent in our section", "no script_location"],
)
def test_a_broken_ini_is_a_configuration_error_that_names_the_file(
    tmp_path: Path, text: str, needle: str
) -> None:
    (tmp_path / "broken.ini").write_text(text)
    for command in ("upgrade", "current", "status"):
        result = cli("-c", "broken.ini", command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert_no_traceback(result)
        assert result.stderr.startswith(
            f"alembic-sqlite-lock: error: The configuration file {tmp_path / 'broken.ini'} "
        ), result.stderr
        assert needle in result.stderr
        assert "--verbose" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ini"]  # nothing created


def test_init_flask_migrate_writes_flask_migrates_layout_with_the_one_call_env(
    tmp_path: Path,
) -> None:
    """The files `flask db init` writes, alembic.ini inside the folder, env.py in the
    one-call form (that Flask-Migrate runs it is tested in tests/frameworks/)."""
    result = cli("init", "--flask-migrate", "migrations", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    env = tmp_path / "migrations"
    assert sorted(p.name for p in env.iterdir()) == [
        "README", "alembic.ini", "env.py", "script.py.mako", "versions"]
    assert not (tmp_path / "alembic.ini").exists()
    env_py = (env / "env.py").read_text()
    assert "run_migrations(context, get_metadata(), **conf_args)" in env_py
    assert 'current_app.extensions["migrate"]' in env_py
    ini = configparser.ConfigParser()
    ini.read(env / "alembic.ini")
    assert ini["logger_alembic_sqlite_lock"]["level"] == "INFO"
    assert "alembic_sqlite_lock" in ini["loggers"]["keys"]
    assert "`flask db upgrade` from every worker" in result.stdout


def test_init_flask_migrate_refuses_an_ini_path_a_url_and_a_full_folder(
    tmp_path: Path,
) -> None:
    for extra in (["-c", "x.ini"], ["--url", "sqlite:///x.db"]):
        result = cli("init", "--flask-migrate", "migrations", *extra, cwd=tmp_path)
        assert result.returncode == _cli.EXIT_USAGE
        assert "Flask-Migrate reads alembic.ini from the migrations folder" in result.stderr
        assert_no_traceback(result)
        assert not (tmp_path / "migrations").exists()
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "alembic.ini").write_text("mine")
    result = cli("init", "--flask-migrate", "migrations", cwd=tmp_path)
    assert result.returncode == _cli.EXIT_USAGE
    assert (tmp_path / "migrations" / "alembic.ini").read_text() == "mine"


@pytest.mark.slow
def test_an_init_project_survives_eight_concurrent_cli_upgrades(tmp_path: Path) -> None:
    project = init_project(tmp_path / "proj")
    results = run_together(
        [["alembic-sqlite-lock", "upgrade", "-x", "lock_backup_dir=backups"]] * 8,
        cwd=project.root, timeout_s=240,
    )
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    applied = Counter(rev for r in results
                      for rev in re.findall(r"Applied migration: (\w+)", r.stderr))
    assert applied == Counter(DEMO_REVISIONS)
    assert sum(1 for r in results if "Applied migration" in r.stderr) == 1
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    # Exactly one backup: only the worker that migrated made one.
    assert [p.name.split(".")[2] for p in (project.root / "backups").iterdir()] == [
        "base-to-0008"
    ]


def test_an_init_project_works_with_plain_alembic(tmp_path: Path) -> None:
    project = init_project(tmp_path / "proj")
    result = project.alembic("upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert "INFO  [pid" in result.stderr
    assert "Applied migration: 0008" in result.stderr
    assert project.version() == ["0008"]
    again = project.alembic("upgrade", "head")
    assert "Database already at 0008, nothing to do" in again.stderr


# upgrade, downgrade, stamp, current -------------------------------------------------

def test_upgrade_downgrade_stamp_current(project: Project) -> None:
    root = project.root
    assert cli("current", cwd=root).stdout == "base (no revision)\n"
    up = cli("upgrade", "0004", cwd=root)
    assert up.returncode == 0, up.stderr
    assert "Applied migration: 0004" in up.stderr
    assert project.version() == ["0004"]
    assert cli("current", cwd=root).stdout == "0004\n"

    assert cli("-c", str(project.ini), "upgrade", cwd=root.parent).returncode == 0
    assert cli("current", cwd=root).stdout == "0008 (head)\n"
    nothing = cli("upgrade", "head", cwd=root)
    assert nothing.returncode == 0
    assert "Database already at 0008, nothing to do" in nothing.stderr

    down = cli("downgrade", "-1", cwd=root)
    assert down.returncode == 0, down.stderr
    assert "Reverted migration: 0008" in down.stderr
    assert project.version() == ["0007"]

    stamp = cli("stamp", "0008", cwd=root)
    assert stamp.returncode == 0, stamp.stderr
    assert project.version() == ["0008"]
    assert "display_name" not in str(project.query("PRAGMA table_info(users)"))


def test_sql_prints_the_migration_and_touches_no_database(project: Project) -> None:
    result = cli("upgrade", "--sql", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE users" in result.stdout
    assert "INSERT INTO alembic_version" in result.stdout
    assert not project.db.exists()
    down = cli("downgrade", "--sql", "0008:0007", cwd=project.root)
    assert down.returncode == 0, down.stderr
    assert "UPDATE alembic_version SET version_num='0007'" in down.stdout


def test_x_arguments_reach_env_py_and_lock_settings(project: Project) -> None:
    text = project.env_py.read_text().replace(
        "run_migrations(context, target_metadata)",
        "print('X=', sorted(context.get_x_argument(as_dictionary=True).items()))\n"
        "run_migrations(context, target_metadata)",
    )
    project.env_py.write_text(text)
    result = cli("upgrade", "-x", "tenant=blue", "-x", "lock_deadline_s=60", cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert "X= [('lock_deadline_s', '60'), ('tenant', 'blue')]" in result.stdout
    bad = cli("upgrade", "-x", "lock_deadline_s=soon", cwd=project.root)
    assert bad.returncode == _cli.EXIT_USAGE
    assert "lock_deadline_s (-x option) must be a number of seconds" in bad.stderr


def test_read_only_commands_take_no_write_lock(project: Project) -> None:
    assert project.alembic("upgrade", "head").returncode == 0
    writer = sqlite3.connect(project.db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # SQLite's write lock, held by someone else
        with held_flock(Path(str(project.db) + SUFFIX)):  # and the run lock
            current = cli("current", "--deadline_s", "1", "--busy_timeout_s", "0.2",
                          cwd=project.root)
            status = cli("status", "--deadline_s", "1", "--busy_timeout_s", "0.2",
                         cwd=project.root)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert current.returncode == 0, current.stderr
    assert current.stdout == "0008 (head)\n"
    assert status.returncode == 0, status.stderr
    assert "Migration:  running" in status.stdout


# Exit codes -------------------------------------------------------------------------

def test_exit_code_usage_errors(project: Project) -> None:
    root = project.root
    cases = {
        ("upgrade", "nosuchrev"): "Revision 'nosuchrev' does not exist",
        ("-c", "missing.ini", "upgrade"): "No Alembic configuration file at",
        ("upgrade", "--deadline_s", "0"): "--deadline_s must be a finite number of seconds > 0",
        ("upgrade", "--max_attempts", "many"): "--max_attempts must be a whole number, got 'many'",
        ("upgrade", "-x", "lock_nope=1"): "Valid settings: lock_max_attempts",
        ("frobnicate",): "invalid choice: 'frobnicate'",
        ("downgrade",): "the following arguments are required: revision",
    }
    for args, message in cases.items():
        result = cli(*args, cwd=root)
        assert result.returncode == _cli.EXIT_USAGE, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert_no_traceback(result)
    assert project.version() == []


def test_exit_code_configuration_error_for_an_unprotected_env_py(project: Project) -> None:
    project.env_py.write_text(  # Alembic's stock online boilerplate, no lock
        "from alembic import context\n"
        "from sqlalchemy import engine_from_config, pool\n"
        "config = context.config\n"
        "engine = engine_from_config(config.get_section(config.config_ini_section),\n"
        "                            prefix='sqlalchemy.', poolclass=pool.NullPool)\n"
        "with engine.connect() as connection:\n"
        "    context.configure(connection=connection)\n"
        "    with context.begin_transaction():\n"
        "        context.run_migrations()\n"
    )
    result = cli("upgrade", cwd=project.root)
    assert result.returncode == _cli.EXIT_USAGE
    assert "does not run migrations through alembic_sqlite_lock.run_migrations()" in (
        result.stderr)
    assert_no_traceback(result)
    assert project.version() == []


def test_exit_code_migration_failed_and_verbose_traceback(project: Project) -> None:
    project.add_revision("0009", "0008", "op.execute('SELECT * FROM no_such_table')")
    result = cli("upgrade", cwd=project.root)
    assert result.returncode == _cli.EXIT_MIGRATION_FAILED
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1  # one paragraph
    assert lines[0].startswith("alembic-sqlite-lock: error: Migration 0009 (test revision "
                               "0009) failed on sqlite:///")
    assert "run was rolled back" in lines[0]
    assert_no_traceback(result)
    assert project.version() == []

    verbose = cli("upgrade", "--verbose", cwd=project.root)
    assert verbose.returncode == _cli.EXIT_MIGRATION_FAILED
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "no such table: no_such_table" in verbose.stderr


def test_exit_code_lock_timeout(project: Project) -> None:
    with held_flock(Path(str(project.db) + SUFFIX)):
        result = cli("upgrade", "--deadline_s", "1", "--busy_timeout_s", "0.3",
                     cwd=project.root)
    assert result.returncode == _cli.EXIT_LOCK_TIMEOUT
    assert "error: Could not take the migration lock on sqlite:///" in result.stderr
    assert_no_traceback(result)
    assert project.version() == []


def test_exit_code_other_errors(project: Project) -> None:
    project.env_py.write_text("raise RuntimeError('env.py is broken')\n")
    result = cli("upgrade", cwd=project.root)
    assert result.returncode == _cli.EXIT_OTHER
    assert "error: RuntimeError: env.py is broken (--verbose shows the traceback)" in (
        result.stderr)
    assert_no_traceback(result)


def test_main_in_process_returns_the_exit_code(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Only paths that stop before env.py: its fileConfig() would rewire pytest's logging.
    assert _cli.main(["-c", str(tmp_path / "missing.ini"), "current"]) == _cli.EXIT_USAGE
    assert "No Alembic configuration file at" in capsys.readouterr().err
    assert _cli.main(["init", str(tmp_path / "env"), "-c", str(tmp_path / "a.ini")]) == 0
    assert (tmp_path / "env" / "env.py").exists()
