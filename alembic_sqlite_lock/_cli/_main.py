"""The ``alembic-sqlite-lock`` command line: a thin layer over the Python API.

Exit codes (also in ``alembic-sqlite-lock --help``):

* 0 success, including "nothing to do";
* 1 a migration failed and was rolled back (MigrationError);
* 2 usage or configuration error: bad arguments, a bad setting or alembic.ini, env.py
  without run_migrations(), an unknown revision (ConfigurationError, CommandError);
* 3 the migration lock could not be taken in time (LockTimeout);
* 4 any other error (an unreadable database, an exception in env.py).

Errors are one paragraph on stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import configparser
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from alembic.config import Config
from alembic.util import CommandError

from .. import _commands
from .._errors import (
    ConfigurationError,
    LockTimeout,
    MigrationError,
    MigrationLockError,
    MultipleHeadsError,
    UnknownDatabaseRevision,
    UnknownRevision,
)
from .._settings import NAMES, SETTINGS, X_PREFIX, Setting, convert
from .._settings import SECTION as SETTINGS_SECTION
from .._version import __version__
from . import _init as _scaffold

PROG = "alembic-sqlite-lock"

EXIT_OK = 0
EXIT_MIGRATION_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCK_TIMEOUT = 3
EXIT_OTHER = 4

EXIT_CODES_HELP = """\
exit codes:
  0  success, including nothing to do
  1  a migration failed; the run was rolled back (MigrationError)
  2  usage or configuration error (bad arguments or settings, unknown revision,
     several heads, a database ahead of the code, env.py without run_migrations())
  3  the migration lock was not free in time (LockTimeout)
  4  any other error (an unusable database file, an exception in env.py)
  130  interrupted (Ctrl-C); 143  stopped by SIGTERM during a run (rolled back)
"""

EXEC_EPILOG = """\
examples:
  alembic-sqlite-lock exec --url sqlite:///mlflow.db -- mlflow db upgrade sqlite:///mlflow.db
  alembic-sqlite-lock exec --url sqlite:///optuna.db -- optuna storage upgrade \\
      --storage sqlite:///optuna.db
  alembic-sqlite-lock exec --url sqlite:///instance/app.db -- flask db upgrade

The command's own runs on the same database (an env.py that uses run_migrations,
migration_lock()) see the lock is held for them and go on. If this process is killed,
the command does not go on unlocked: on SQLite it keeps the lock until it exits; on a
server it is killed with this process. SIGTERM, SIGINT and SIGHUP are passed on to it.

exit codes: the command's (128 + N if signal N killed it); 126 or 127 if it could not
be started; 2 or 3 as below if the lock could not be taken (the command did not run).
""" + EXIT_CODES_HELP

DESCRIPTION = """\
Run Alembic migrations on SQLite from every worker at once: exactly one worker applies
each migration, the others wait and carry on. Settings can be given as flags with the
names used everywhere else (--deadline_s 300), as -x lock_<name>=<value>, or in the
[alembic_sqlite_lock] section of alembic.ini, in that order of precedence.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(args.verbose or args.global_verbose)
    try:
        result: int = args.handler(args)
        return result
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        code = exit_code_for(error)
        _report(error, code, verbose)
        return code


def exit_code_for(error: BaseException) -> int:
    if isinstance(error, LockTimeout):
        return EXIT_LOCK_TIMEOUT
    if isinstance(error, MigrationError):
        return EXIT_MIGRATION_FAILED
    if isinstance(error, (ConfigurationError, UnknownRevision, MultipleHeadsError,
                          UnknownDatabaseRevision)):
        return EXIT_USAGE  # nothing ran: the command, the settings or the code is wrong
    if isinstance(error, CommandError) and not isinstance(error, MigrationLockError):
        return EXIT_USAGE  # Alembic's own: unknown revision, no script_location...
    return EXIT_OTHER


def _report(error: BaseException, code: int, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    message = " ".join(str(error).split()) or type(error).__name__
    if code == EXIT_OTHER and not isinstance(error, CommandError):
        message = f"{type(error).__name__}: {message}"
    hint = "" if verbose else " (--verbose shows the traceback)"
    # The hint is for the unexpected: our own errors say all there is to say.
    unexpected = code == EXIT_OTHER and not isinstance(error, MigrationLockError)
    print(f"{PROG}: error: {message}{hint if unexpected else ''}", file=sys.stderr)


# Parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # The common options are accepted before the command too, as `alembic -c x.ini ...`.
    _add_common(parser, prefix="global_")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    init = _command(commands, "init", _cmd_init,
                    "create a new Alembic environment that uses the lock",
                    common=False)
    init.add_argument("directory", help="the folder for env.py, script.py.mako, versions/; "
                      "must not exist or be empty")
    init.add_argument("-c", "--config", default=None,
                      help="where to write alembic.ini (default: ./alembic.ini)")
    init.add_argument("--url", default=_scaffold.DEFAULT_URL,
                      help="sqlalchemy.url to write (default: %(default)s)")
    init.add_argument("--flask-migrate", action="store_true",
                      help="Flask-Migrate's layout (alembic.ini inside DIRECTORY, its env.py "
                           "calling run_migrations), for `flask db upgrade` from every worker")
    init.add_argument("--async", dest="async_template", action="store_true",
                      help="the env.py of Alembic's async template in the one-call form, "
                           "for an async app's URL (default then: "
                           f"{_scaffold.ASYNC_DEFAULT_URL.replace('%', '%%')})")
    init.add_argument("-v", "--verbose", action="store_true",
                      help="show the traceback of an error")

    upgrade = _command(commands, "upgrade", _cmd_upgrade,
                       "upgrade to a revision (default head) under the migration lock")
    upgrade.add_argument("revision", nargs="?", default="head",
                         help="target revision (default: head); with --sql also FROM:TO")
    _add_write_options(upgrade)

    downgrade = _command(commands, "downgrade", _cmd_downgrade,
                         "downgrade to a revision under the migration lock")
    downgrade.add_argument("revision", help="target revision, e.g. -1 or base; "
                           "with --sql FROM:TO")
    _add_write_options(downgrade)

    stamp = _command(commands, "stamp", _cmd_stamp,
                     "set the version table without running migrations, under the lock")
    stamp.add_argument("revisions", nargs="+", metavar="revision",
                       help="revision(s) to stamp, e.g. head")
    stamp.add_argument("--purge", action="store_true",
                       help="delete all entries in the version table before stamping")
    _add_write_options(stamp)

    _command(commands, "current", _cmd_current,
             "show the database's current revision (read-only, takes no lock)")

    status = _command(commands, "status", _cmd_status,
                      "current revision, heads, pending revisions, who is migrating "
                      "right now, backups (read-only, takes no lock)")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    run = _command(commands, "exec", _cmd_exec,
                   "run a command (a framework's own migration step) while holding the "
                   "migration lock; exits with the command's exit code")
    run.add_argument("--url", default=None,
                     help="the database to lock (default: sqlalchemy.url of alembic.ini)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                     help="the command to run, after --")
    run.epilog = EXEC_EPILOG
    return parser


def _command(commands: Any, name: str, handler: Callable[[argparse.Namespace], int],
             summary: str, *, common: bool = True) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=summary + ".", epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(handler=handler, verbose=False, config=None, name=None, x=[])
    if common:
        _add_common(sub)
    return sub


def _add_common(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(
        "-c", "--config", dest=prefix + "config", default=None,
        help="alembic.ini to use (default: $ALEMBIC_CONFIG or ./alembic.ini)",
    )
    parser.add_argument(
        "-n", "--name", dest=prefix + "name", default=None,
        help="the ini section of the Alembic settings (default: alembic)",
    )
    parser.add_argument(
        "-x", dest=prefix + "x", action="append", default=[], metavar="KEY=VALUE",
        help="passed to env.py (context.get_x_argument()); -x lock_<setting>=<value> "
             "sets a lock setting; repeatable",
    )
    parser.add_argument("-v", "--verbose", dest=prefix + "verbose", action="store_true",
                        help="show the traceback of an error")
    _add_settings(parser, prefix)


def _add_settings(parser: argparse.ArgumentParser, prefix: str) -> None:
    group = parser.add_argument_group(
        "lock settings",
        f"the same names as in [alembic_sqlite_lock] and -x {X_PREFIX}<name>; a flag wins",
    )
    for setting in SETTINGS:
        group.add_argument(
            f"--{setting.name}", dest=f"{prefix}setting_{setting.name}", default=None,
            metavar=setting.metavar, help=_flag_help(setting),
        )


def _flag_help(setting: Setting) -> str:
    # A help text that names its own default ("(default: derived)") keeps it.
    if "(default:" in setting.help:
        return setting.help
    return f"{setting.help} (default: {setting.shown_default})"


def _add_write_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sql", action="store_true",
                        help="print the SQL instead of running it (touches no database)")
    parser.add_argument("--tag", default=None,
                        help="an arbitrary tag for custom env.py files "
                             "(context.get_tag_argument())")


# Commands ---------------------------------------------------------------------------

def _config(args: argparse.Namespace) -> Config:
    path = args.config or args.global_config or os.environ.get("ALEMBIC_CONFIG", "alembic.ini")
    if not os.path.isfile(path):
        raise ConfigurationError(
            f"No Alembic configuration file at {os.path.abspath(path)}. Pass its path "
            f"with -c/--config, or create one with `{PROG} init DIR`."
        )
    # Alembic's CLI hands its parsed options to Config as cmd_opts; env.py reads -x
    # (context.get_x_argument()) from there, and so do our lock_* settings.
    cmd_opts = argparse.Namespace(x=[*args.global_x, *args.x], config=path)
    section = args.name or args.global_name or "alembic"
    # As Alembic's own command line: pyproject.toml from the working directory.
    config = _commands.load_config(path, "pyproject.toml", ini_section=section,
                                   cmd_opts=cmd_opts)
    _check_readable(config, os.path.abspath(path), section)
    return config


def _check_readable(config: Config, path: str, section: str) -> None:
    """Fail on a broken alembic.ini now, with its name, rather than mid-command with a
    configparser error that names neither the file nor the fix."""
    try:
        parser = config.file_config
        for name in (section, SETTINGS_SECTION):
            if parser.has_section(name):
                parser.items(name)  # interpolation errors (a lone %) surface here
        # Alembic >= 1.16 also reads script_location from pyproject.toml.
        get_option = getattr(config, "get_alembic_option", config.get_main_option)
        script_location = get_option("script_location")
    except configparser.Error as error:
        msg = (
            f"The configuration file {path} cannot be read: {' '.join(str(error).split())}. "
            "Fix the file: options go in sections such as [alembic], and a literal % is "
            "written %%."
        )
        raise ConfigurationError(msg) from error
    if not script_location:
        msg = (
            f"The configuration file {path} has no script_location in its [{section}] "
            "section, so there are no migration scripts to run. Add `script_location = "
            f"%(here)s/alembic` there (`{PROG} init DIR` writes a complete alembic.ini), "
            "or pick the right section with -n/--name."
        )
        raise ConfigurationError(msg)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, as the keyword arguments of upgrade() and co."""
    settings: dict[str, Any] = {}
    for name in NAMES:
        value = getattr(args, f"setting_{name}", None)
        if value is None:
            value = getattr(args, f"global_setting_{name}", None)
        if value is not None:
            settings[name] = convert(name, value, f"--{name}")
    return settings


def _cmd_init(args: argparse.Namespace) -> int:
    if args.flask_migrate and args.async_template:
        raise ConfigurationError("--flask-migrate and --async are two different layouts: "
                                 "choose one.")
    if args.flask_migrate:
        return _init_flask_migrate(args)
    config = args.config or args.global_config or "alembic.ini"
    url = args.url
    if args.async_template and url == _scaffold.DEFAULT_URL:
        url = _scaffold.ASYNC_DEFAULT_URL
    created = _scaffold.init(args.directory, config, url=url,
                             async_template=args.async_template)
    for path in created:
        print(f"Created {path}{os.sep if path.is_dir() else ''}")
    # With --url the database is chosen already: no need to send the user to edit it.
    first = f"edit sqlalchemy.url in {config}, " if args.url == _scaffold.DEFAULT_URL else ""
    shown = shlex.quote(config)  # the commands below are to be pasted into a shell
    print(f"Next: {first}write a migration with "
          f"`alembic -c {shown} revision -m \"...\"`, then run "
          f"`{PROG} -c {shown} upgrade`.")
    return EXIT_OK


def _init_flask_migrate(args: argparse.Namespace) -> int:
    if args.config or args.global_config or args.url != _scaffold.DEFAULT_URL:
        raise ConfigurationError(
            "--flask-migrate takes neither -c/--config nor --url: Flask-Migrate reads "
            "alembic.ini from the migrations folder and the URL from the app's "
            "SQLALCHEMY_DATABASE_URI."
        )
    for path in _scaffold.init_flask_migrate(args.directory):
        print(f"Created {path}{os.sep if path.is_dir() else ''}")
    shown = shlex.quote(args.directory)
    directory = "" if os.path.normpath(args.directory) == "migrations" else f" -d {shown}"
    print(f"Next: write a migration with `flask db migrate{directory} -m \"...\"`, then "
          f"run `flask db upgrade{directory}` from every worker at start-up.")
    return EXIT_OK


def _cmd_upgrade(args: argparse.Namespace) -> int:
    _commands.upgrade(_config(args), args.revision, sql=args.sql, tag=args.tag,
                      **_settings(args))
    return EXIT_OK


def _cmd_downgrade(args: argparse.Namespace) -> int:
    _commands.downgrade(_config(args), args.revision, sql=args.sql, tag=args.tag,
                        **_settings(args))
    return EXIT_OK


def _cmd_stamp(args: argparse.Namespace) -> int:
    _commands.stamp(_config(args), args.revisions, sql=args.sql, tag=args.tag,
                    purge=args.purge, **_settings(args))
    return EXIT_OK


def _cmd_exec(args: argparse.Namespace) -> int:
    import logging

    from .._lock import run_command

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigurationError(
            f"No command to run. Write it after --, e.g. `{PROG} exec --url "
            "sqlite:///app.db -- flask db upgrade`."
        )
    if args.url and (args.config or args.global_config):
        raise ConfigurationError("Give the database with --url or with -c/--config, not both.")
    target = args.url if args.url else _config(args)
    if args.url and "://" not in args.url:
        raise ConfigurationError(
            f"--url {args.url!r} is not a database URL: expected e.g. sqlite:///app.db or "
            "postgresql://user@host/db."
        )
    # No env.py configures logging here: show the lock's own lines (waiting, timeouts).
    # (The package's logger has a NullHandler only, as a library's should.)
    ours = logging.getLogger("alembic_sqlite_lock")
    if not logging.getLogger().handlers and all(
        isinstance(handler, logging.NullHandler) for handler in ours.handlers
    ):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-5.5s [%(name)s] %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.DEBUG if args.verbose or args.global_verbose else logging.INFO)
    return run_command(target, command, _settings(args))


def _cmd_current(args: argparse.Namespace) -> int:
    from ._inspect import read_state, script_heads

    config = _config(args)
    state = read_state(config, _settings(args))
    heads = set(script_heads(config))
    if not state.current:
        print("base (no revision)")
    for revision in state.current:
        print(f"{revision} (head)" if revision in heads else revision)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from ._status import format_text, gather

    config = _config(args)
    report = gather(config, **_settings(args))
    if args.json:
        import json

        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(format_text(report))
    return EXIT_OK
