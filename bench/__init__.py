"""The benchmark: how long N workers take to run ``upgrade head`` on SQLite.

    make bench                    # full run, about 7 minutes on an idle 2-core machine
    make bench BENCH_ARGS=--quick # about 2.5 minutes, fewer repeats

Variants, side by side in one run: stock Alembic alone and with N racing workers,
``filelock.FileLock`` around ``alembic.command.upgrade`` (what users write by hand), and
this library. And ``lock-ready``: N workers each running a framework's own set-up on a
database already at head, with no lock and inside ``migration_lock(url, ready=...)``.
And long chains whose revision files import an application (``long``: 150 generated
revisions, warm and cold; ``mlflow``: MLflow's own chain, warm), stock vs this library,
and the command line (``cli``): Alembic's ``alembic`` vs ``alembic-sqlite-lock``.
See ``python -m bench --help``.
"""
