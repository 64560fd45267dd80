"""Where the settings come from, in which order, and how a bad one is reported; each
setting described once; resolved once per run.

Keyword arguments beat ``-x lock_<name>=...``, which beats the ``[alembic_sqlite_lock]``
section of alembic.ini, which beats the defaults. A bad or unknown setting stops the
run before any database file is created, and says which setting and where it was set.
``_settings.SETTINGS`` describes each setting once: the dataclasses, the typed keywords,
the CLI's help, the ini ``init`` writes and the reference's table agree with it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from conftest import REPO, Project, write_lock_held

import alembic_sqlite_lock
import alembic_sqlite_lock._cli._status
from alembic import command
from alembic_sqlite_lock import ConfigurationError, LockTimeout, RetryPolicy
from alembic_sqlite_lock._cli import _init, _main
from alembic_sqlite_lock._settings import (
    NAMES,
    SETTINGS,
    SETTINGS_KEY,
    Settings,
    SettingsKeywords,
    resolve_settings,
    run_settings,
)

VALID_NAMES = ("max_attempts", "base_delay_s", "jitter_s", "busy_timeout_s", "deadline_s")


def resolve_policy(config: Config, overrides: Mapping[str, Any] | None = None) -> RetryPolicy:
    return resolve_settings(config, overrides).policy


def make_config(tmp_path: Path, section: str | None = None, x: list[str] | None = None) -> Config:
    """An alembic Config as the CLI builds it: an ini file, and cmd_opts with ``-x``."""
    ini = tmp_path / "alembic.ini"
    text = "[alembic]\nscript_location = %(here)s/alembic\n"
    if section is not None:
        text += f"\n[alembic_sqlite_lock]\n{section}\n"
    ini.write_text(text)
    return Config(str(ini), cmd_opts=argparse.Namespace(x=x))


def set_in_ini(project: Project, line: str) -> None:
    text = project.ini.read_text()
    assert "[alembic_sqlite_lock]\n" in text
    header = "[alembic_sqlite_lock]\n"
    project.ini.write_text(text.replace(header, f"{header}{line}\n"))


def assert_nothing_created(project: Project) -> None:
    assert not project.db.exists()
    assert list(project.root.glob("app.db*")) == []


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


# Precedence, through resolve_policy ---------------------------------------------------


def test_no_settings_anywhere_gives_the_defaults(tmp_path: Path) -> None:
    assert resolve_policy(make_config(tmp_path)) == RetryPolicy()
    assert resolve_policy(make_config(tmp_path, section="")) == RetryPolicy()
    assert resolve_policy(Config()) == RetryPolicy()  # no ini file at all


def test_the_ini_section_overrides_the_defaults(tmp_path: Path) -> None:
    config = make_config(tmp_path, section="max_attempts = 5\ndeadline_s = 60\n")

    assert resolve_policy(config) == RetryPolicy(max_attempts=5, deadline_s=60.0)


def test_x_options_override_the_ini_section(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        section="max_attempts = 5\ndeadline_s = 60\n",
        x=["lock_deadline_s=30", "lock_jitter_s=0.5"],
    )

    assert resolve_policy(config) == RetryPolicy(max_attempts=5, deadline_s=30.0, jitter_s=0.5)


def test_keyword_arguments_override_x_options_and_the_ini(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        section="max_attempts = 5\ndeadline_s = 60\nbase_delay_s = 0.5\n",
        x=["lock_deadline_s=30", "lock_max_attempts=7"],
    )

    policy = resolve_policy(config, {"deadline_s": 10, "busy_timeout_s": 2})

    # deadline_s: kwarg > -x > ini; max_attempts: -x > ini; base_delay_s: ini; jitter: default.
    assert policy == RetryPolicy(
        max_attempts=7, base_delay_s=0.5, jitter_s=0.1, busy_timeout_s=2.0, deadline_s=10.0
    )


def test_settings_handed_down_in_config_attributes_are_not_resolved_again(
    tmp_path: Path,
) -> None:
    """upgrade(cfg, **settings) resolves them and leaves them in config.attributes for
    env.py; a plain alembic command has none there, and run_migrations resolves."""
    config = make_config(tmp_path, x=["lock_deadline_s=30"])
    assert run_settings(config).policy.deadline_s == 30.0

    handed_down = Settings(RetryPolicy(deadline_s=15))
    config.attributes[SETTINGS_KEY] = handed_down
    assert run_settings(config) is handed_down


def test_every_setting_can_come_from_every_source(tmp_path: Path) -> None:
    values = {"max_attempts": "3", "base_delay_s": "0.25", "jitter_s": "0",
              "busy_timeout_s": "4.5", "deadline_s": "9"}
    expected = RetryPolicy(max_attempts=3, base_delay_s=0.25, jitter_s=0.0,
                           busy_timeout_s=4.5, deadline_s=9.0)
    section = "\n".join(f"{name} = {value}" for name, value in values.items())

    assert resolve_policy(make_config(tmp_path, section=section)) == expected
    x = [f"lock_{name}={value}" for name, value in values.items()]
    assert resolve_policy(make_config(tmp_path, x=x)) == expected
    assert resolve_policy(make_config(tmp_path), values) == expected


def test_other_x_options_belong_to_env_py_and_are_ignored(tmp_path: Path) -> None:
    config = make_config(tmp_path, x=["tenant=acme", "dry_run", "deadline_s=abc",
                                      "lock_deadline_s=7"])

    assert resolve_policy(config) == RetryPolicy(deadline_s=7.0)


# Bad and unknown settings, through resolve_policy --------------------------------------


@pytest.mark.parametrize(
    ("section", "x", "kwargs", "named"),
    [
        ("deadline_s = soon", None, {}, "deadline_s"),
        ("max_attempts = 2.5", None, {}, "max_attempts"),
        ("jitter_s = -1", None, {}, "jitter_s"),
        ("busy_timeout_s = inf", None, {}, "busy_timeout_s"),
        (None, ["lock_deadline_s=abc"], {}, "lock_deadline_s"),
        (None, ["lock_max_attempts=0"], {}, "lock_max_attempts"),
        (None, ["lock_base_delay_s=nan"], {}, "lock_base_delay_s"),
        (None, ["lock_deadline_s"], {}, "lock_deadline_s"),
        (None, None, {"deadline_s": -5}, "deadline_s"),
        (None, None, {"max_attempts": True}, "max_attempts"),
        (None, None, {"jitter_s": "lots"}, "jitter_s"),
    ],
)
def test_a_bad_value_is_a_configuration_error_naming_the_setting(
    tmp_path: Path, section: str | None, x: list[str] | None, kwargs: dict[str, object],
    named: str,
) -> None:
    config = make_config(tmp_path, section=section, x=x)

    with pytest.raises(ConfigurationError, match=rf"\b{named}\b") as caught:
        resolve_policy(config, kwargs)

    if section is not None:
        assert str(tmp_path / "alembic.ini") in str(caught.value)


def test_a_bad_value_is_reported_even_when_a_higher_source_overrides_it(
    tmp_path: Path,
) -> None:
    """A typo in alembic.ini must not hide until the day the -x override is dropped."""
    config = make_config(tmp_path, section="deadline_s = abc", x=["lock_deadline_s=5"])

    with pytest.raises(ConfigurationError, match="deadline_s"):
        resolve_policy(config)


def test_unknown_key_in_the_ini_section_lists_the_valid_names(tmp_path: Path) -> None:
    config = make_config(tmp_path, section="deadline = 60\nmax_attempts = 3")

    with pytest.raises(ConfigurationError) as caught:
        resolve_policy(config)

    message = str(caught.value)
    assert "deadline" in message
    assert str(tmp_path / "alembic.ini") in message
    for name in VALID_NAMES:
        assert name in message


def test_unknown_lock_x_option_lists_the_valid_x_names(tmp_path: Path) -> None:
    config = make_config(tmp_path, x=["lock_foo=1"])

    with pytest.raises(ConfigurationError) as caught:
        resolve_policy(config)

    message = str(caught.value)
    assert "lock_foo" in message
    for name in VALID_NAMES:
        assert f"lock_{name}" in message


def test_unknown_keyword_argument_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve_policy(make_config(tmp_path), {"timeout": 3})

    assert "timeout" in str(caught.value)
    for name in VALID_NAMES:
        assert name in str(caught.value)


# End to end: the stock alembic CLI and upgrade() ---------------------------------------


def test_bad_x_option_fails_the_cli_cleanly_before_any_file_exists(project: Project) -> None:
    result = project.alembic("-x", "lock_deadline_s=abc", "upgrade", "head")

    assert result.returncode != 0
    # Alembic prints "FAILED: <message>" on stdout and logs the message on stderr.
    assert "FAILED:" in result.stdout, output(result)
    assert "lock_deadline_s" in result.stdout
    assert "lock_deadline_s" in result.stderr
    assert "Traceback" not in output(result)
    assert_nothing_created(project)


def test_unknown_lock_x_option_fails_the_cli_listing_valid_names(project: Project) -> None:
    result = project.alembic("-x", "lock_foo=1", "upgrade", "head")

    assert result.returncode != 0
    assert "FAILED:" in result.stdout, output(result)
    assert "lock_foo" in result.stdout
    assert "lock_deadline_s" in result.stdout
    assert "Traceback" not in output(result)
    assert_nothing_created(project)


def test_bad_ini_value_fails_the_cli_naming_the_setting_and_the_file(project: Project) -> None:
    set_in_ini(project, "max_attempts = -1")

    result = project.alembic("upgrade", "head")

    assert result.returncode != 0
    assert "FAILED:" in result.stdout, output(result)
    assert "max_attempts" in result.stdout
    assert str(project.ini) in result.stdout
    assert "Traceback" not in output(result)
    assert_nothing_created(project)


def test_unknown_ini_key_fails_the_cli_listing_valid_names(project: Project) -> None:
    set_in_ini(project, "retries = 3")

    result = project.alembic("upgrade", "head")

    assert result.returncode != 0
    assert "FAILED:" in result.stdout, output(result)
    assert "retries" in result.stdout
    for name in VALID_NAMES:
        assert name in result.stdout
    assert_nothing_created(project)


def test_other_x_options_do_not_disturb_the_cli(project: Project) -> None:
    result = project.alembic("-x", "tenant=acme", "-x", "lock_max_attempts=3", "upgrade", "head")

    assert result.returncode == 0, output(result)
    assert project.version() == ["0008"]


def test_upgrade_with_a_bad_keyword_raises_before_anything_is_created(project: Project) -> None:
    with pytest.raises(ConfigurationError, match="deadline_s"):
        alembic_sqlite_lock.upgrade(project.ini, deadline_s=-5)
    assert_nothing_created(project)

    with pytest.raises(ConfigurationError, match="lock_timeout") as caught:
        alembic_sqlite_lock.upgrade(project.ini, lock_timeout=5)
    assert "deadline_s" in str(caught.value)
    assert_nothing_created(project)




# Retry at once, give up at once: the attempt count in LockTimeout shows who won.
NO_WAITING = "busy_timeout_s = 0\nbase_delay_s = 0\njitter_s = 0\nmax_attempts = 2"


def test_precedence_end_to_end_through_the_cli(project: Project) -> None:
    set_in_ini(project, NO_WAITING)
    with write_lock_held(project.db):
        from_ini = project.alembic("upgrade", "head")
        from_x = project.alembic("-x", "lock_max_attempts=3", "upgrade", "head")

    assert from_ini.returncode != 0
    assert "after 2 attempts" in from_ini.stdout, output(from_ini)
    assert from_x.returncode != 0
    assert "after 3 attempts" in from_x.stdout, output(from_x)
    assert project.version() == []


def test_precedence_end_to_end_through_upgrade(project: Project) -> None:
    set_in_ini(project, NO_WAITING)
    config = Config(str(project.ini), cmd_opts=argparse.Namespace(x=["lock_max_attempts=3"]))
    with write_lock_held(project.db):
        with pytest.raises(LockTimeout) as from_x:
            alembic_sqlite_lock.upgrade(config)
        with pytest.raises(LockTimeout) as from_kwarg:
            alembic_sqlite_lock.upgrade(config, max_attempts=4)

    assert from_x.value.attempts == 3
    assert from_kwarg.value.attempts == 4
    assert project.version() == []


# Known gaps: a bad setting that does not fail cleanly ----------------------------------


def test_bad_x_option_fails_offline_too(project: Project) -> None:
    result = project.alembic("-x", "lock_deadline_s=abc", "upgrade", "head", "--sql")

    assert result.returncode != 0
    assert "lock_deadline_s" in result.stdout


def test_upgrade_offline_rejects_a_bad_keyword(project: Project) -> None:
    with pytest.raises(ConfigurationError, match="deadline_s"):
        alembic_sqlite_lock.upgrade(project.ini, sql=True, deadline_s="abc")


def test_percent_sign_in_the_ini_section_is_a_clean_error(project: Project) -> None:
    set_in_ini(project, "deadline_s = 50%")

    result = project.alembic("upgrade", "head")

    assert result.returncode != 0
    assert "FAILED:" in result.stdout, output(result)
    assert "deadline_s" in result.stdout
    assert "Traceback" not in output(result)


# Each setting described once: everything else agrees with _settings.SETTINGS ----------


def test_the_description_agrees_with_the_dataclasses() -> None:
    """Settings() and RetryPolicy() hold the described defaults, field for field."""
    policy_names = [f.name for f in fields(RetryPolicy)]
    other_names = [f.name for f in fields(Settings) if f.name != "policy"]
    assert sorted(NAMES) == sorted(policy_names + other_names)
    assert len(set(NAMES)) == len(NAMES)
    for setting in SETTINGS:
        owner = RetryPolicy() if setting.name in policy_names else Settings()
        default = getattr(owner, setting.name)
        assert default == setting.default, setting.name
        assert default is None or type(default) is setting.kind, setting.name


def test_the_typed_keywords_are_every_setting_with_its_type() -> None:
    hints = typing.get_type_hints(SettingsKeywords)
    assert list(hints) == list(NAMES)
    assert not SettingsKeywords.__required_keys__  # total=False: every keyword optional
    for setting in SETTINGS:
        hint = hints[setting.name]
        assert setting.kind in (typing.get_args(hint) or (hint,)), setting.name


def test_the_public_commands_take_the_typed_keywords() -> None:
    for function in (alembic_sqlite_lock.upgrade, alembic_sqlite_lock.downgrade,
                     alembic_sqlite_lock.stamp, alembic_sqlite_lock.upgrade_async):
        hints = typing.get_type_hints(function, include_extras=True)
        assert typing.get_args(hints["settings"]) == (SettingsKeywords,), function


def reference_settings_rows() -> list[tuple[str, str]]:
    text = (REPO / "docs" / "reference.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.MULTILINE)
    return [(name, default.strip()) for name, default in rows]


def test_the_reference_table_lists_every_setting_with_its_default() -> None:
    assert reference_settings_rows() == [(s.name, s.shown_default) for s in SETTINGS]


def test_the_cli_help_comes_from_the_description() -> None:
    parser = _main.build_parser()
    upgrade = next(
        action for action in parser._subparsers._group_actions  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction)
    ).choices["upgrade"]
    flags = {action.option_strings[0]: action for action in upgrade._actions
             if action.option_strings}
    for setting in SETTINGS:
        flag = flags[f"--{setting.name}"]
        assert flag.metavar == setting.metavar
        assert flag.help is not None
        assert flag.help.startswith(setting.help)
        assert f"(default: {setting.shown_default})" in flag.help


def test_the_ini_init_writes_comes_from_the_description() -> None:
    section = _init.settings_section()
    flat = " ".join(line.lstrip("# ") for line in section.splitlines())
    for setting in SETTINGS:
        assert f"\n# {setting.name} = {setting.ini_default}".rstrip() + "\n" in section
        assert f"{setting.name}: {setting.help}" in flat


def test_init_reads_its_files_from_the_templates_folder() -> None:
    folder = Path(_init.__file__).with_name("templates")
    for name in ("env.py", "script.py.mako", "README"):
        assert _init.template(name) == (folder / name).read_text()
    ini = _init.ini_text("%(here)s/migrations")
    assert "script_location = %(here)s/migrations\n" in ini
    assert _init.settings_section() in ini
    assert "${" not in ini


# Resolved once per run ---------------------------------------------------------------


@pytest.fixture
def resolutions(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Every call of resolve_settings, wherever the package imported it from."""
    from alembic_sqlite_lock import _settings

    original = _settings.resolve_settings
    calls: list[Config] = []

    def spy(config: Config, overrides: Mapping[str, Any] | None = None) -> Settings:
        calls.append(config)
        return original(config, overrides)

    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if name.startswith("alembic_sqlite_lock") and (
            getattr(module, "resolve_settings", None) is original
        ):
            monkeypatch.setattr(module, "resolve_settings", spy)
    return calls


def test_upgrade_resolves_the_settings_once(project: Project, resolutions: list[Config]) -> None:
    set_in_ini(project, "backup_dir = backups")

    applied = alembic_sqlite_lock.upgrade(project.ini, deadline_s=60, backup_keep=2)

    assert applied[-1] == "0008"  # migrated: the look, the wait, the locked run, a backup
    assert len(resolutions) == 1
    resolutions.clear()
    assert alembic_sqlite_lock.upgrade(project.ini) == []  # nothing to do
    assert len(resolutions) == 1


def test_offline_upgrade_resolves_the_settings_once(
    project: Project, resolutions: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    alembic_sqlite_lock.upgrade(project.ini, sql=True, deadline_s=60)

    assert "CREATE TABLE" in capsys.readouterr().out
    assert len(resolutions) == 1


def test_a_plain_alembic_command_resolves_the_settings_once_in_env_py(
    project: Project, resolutions: list[Config]
) -> None:
    config = Config(str(project.ini), cmd_opts=argparse.Namespace(x=["lock_deadline_s=60"]))

    command.upgrade(config, "head")

    assert project.version() == ["0008"]
    assert len(resolutions) == 1


def test_status_resolves_the_settings_once(project: Project, resolutions: list[Config]) -> None:
    alembic_sqlite_lock.upgrade(project.ini)  # a database to look at: env.py runs
    resolutions.clear()

    report = alembic_sqlite_lock._cli._status.gather(Config(str(project.ini)), deadline_s=60)

    assert report.current == ["0008"]
    assert len(resolutions) == 1
