"""gunicorn settings for the example: `gunicorn -c gunicorn.conf.py 'app:create_app()'`.

Command-line options (--bind, --workers...) override these.
"""

bind = "127.0.0.1:8000"
workers = 4

# Every worker waits for the migration lock while it boots, and gunicorn kills a worker
# that is silent for `timeout` seconds: keep it above your longest migration.
timeout = 120

# gunicorn merges this into its own defaults (top-level keys are replaced whole). The
# root logger collects the app's and alembic_sqlite_lock's lines and prints them on
# stderr like gunicorn's own, with the worker pid: "[pid] [INFO] name: message".
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "alembic": {"level": "WARNING"},  # Alembic's per-step chatter
    },
    "formatters": {
        "generic": {
            "format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
            "datefmt": "[%Y-%m-%d %H:%M:%S %z]",
        },
    },
}
