"""Where a worker's time goes: cProfile over forked solo runs, merged.

    .venv/bin/python -m bench.profile --variant ours --case warm
    .venv/bin/python -m bench.profile --variant stock --case cold --sort tottime
    .venv/bin/python -m bench.profile --variant ready-ini --case lock-ready
    .venv/bin/python -m bench.profile --variant stock --case warm --project heavy

Each run is one forked worker (as in the benchmark) profiled from its start signal to
its end; the statistics of all runs are merged and the top functions printed. The
lock-ready case's variants (setup, ready-ini, ready-dir, ready-fn) run on a database
migrated to head first. ``--project heavy`` profiles on the benchmark's 150-revision
chain whose revision files import an application (``projects.heavy_chain_project``)
instead of the 8-revision demo chain.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import projects
from .forked import Work, run_together
from .run import enable_bytecode
from .variants import BY_NAME, OURS, READY


def _profiled(work: Work, out: Path, index: int) -> Work:
    def run() -> None:
        profiler = cProfile.Profile()
        try:
            profiler.runcall(work)
        finally:
            profiler.dump_stats(str(out / f"run{index}.prof"))

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--variant", choices=sorted(BY_NAME), default="ours")
    parser.add_argument("--case", choices=["cold", "warm", "lock-ready"], default="cold")
    parser.add_argument("--project", choices=["demo", "heavy"], default="demo",
                        help="the 8-revision demo chain, or the 150-revision chain whose "
                             "files import an application")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="cumulative", help="pstats sort key")
    args = parser.parse_args(argv)
    variant = BY_NAME[args.variant]
    if (args.case == "lock-ready") != (variant in READY):
        parser.error("--case lock-ready goes with the variants "
                     f"{', '.join(v.name for v in READY)}, and only with them")
    enable_bytecode()
    tmp = Path(tempfile.mkdtemp(prefix="alembic-sqlite-lock-profile-"))
    try:
        if args.project == "heavy":
            project = projects.heavy_chain_project(tmp / "project", stock=variant.stock_env)
        else:
            project = projects.demo_project(tmp / "project", stock=variant.stock_env)
        stats_dir = tmp / "stats"
        stats_dir.mkdir()
        log = tmp / "workers.log"
        if args.case == "lock-ready":
            run_together(OURS.work(project.ini), 1, log_path=log)  # to head
        run_together(variant.work(project.ini), 1, log_path=log)  # compiles bytecode
        for index in range(args.runs):
            if args.case == "cold":
                project.reset()
            rnd = run_together(_profiled(variant.work(project.ini), stats_dir, index), 1,
                               log_path=log)
            if rnd.failed:
                print(rnd.outcomes[0].error, file=sys.stderr)
                return 1
        stats = pstats.Stats(*(str(p) for p in sorted(stats_dir.glob("*.prof"))))
        print(f"{variant.label}, {args.case} start on the {args.project} chain, "
              f"{args.runs} runs merged "
              "(times are totals over all runs)")
        stats.strip_dirs().sort_stats(args.sort).print_stats(args.top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
