"""``python -m bench``: run every case, print the table, write the plot and the table."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from scripts.workers import REPO

from . import cases, handoff, report
from .machine import describe
from .stats import Results
from .variants import ALL, FILELOCK, OURS, STOCK

RESULTS = REPO / "bench" / "results"
LONG_REPEATS = 10
"""At most this many repeats for the long and mlflow sections unless --long-repeats."""
SECTIONS = ("start", "lock-ready", "cli", "chain", "long", "handoff", "mlflow")
"""In the order they run: ``mlflow`` last, as it imports MLflow into this process."""


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="5 repeats instead of 20: about 2.5 minutes instead of 7 "
                             "on an idle 2-core machine")
    parser.add_argument("--repeats", type=int, help="repeats per case (overrides --quick)")
    parser.add_argument("--ns", type=_ints, default=[1, 4, 10, 32, 64],
                        help="N for the cold start (default 1,4,10,32,64)")
    parser.add_argument("--warm-ns", type=_ints, default=[1, 10, 32],
                        help="N for the warm start (default 1,10,32)")
    parser.add_argument("--ready-ns", type=_ints, default=[1, 32],
                        help="N for lock-ready: a framework's set-up on a database at head, "
                             "without a lock and in migration_lock(ready=...) (default 1,32)")
    parser.add_argument("--chain", type=_ints, default=[20, 80],
                        help="long-chain lengths; the per-revision cost is the slope between "
                             "the first and the last (default 20,80)")
    parser.add_argument("--long-ns", type=_ints, default=[1, 32],
                        help="N for the long chains whose revision files import an "
                             "application (long: 150 generated revisions, warm and cold; "
                             "mlflow: MLflow's chain, warm) (default 1,32)")
    parser.add_argument("--long-repeats", type=int, metavar="REPEATS",
                        help="repeats for the long and mlflow sections (default: "
                             f"--repeats, at most {LONG_REPEATS}: their stock rounds at "
                             "N=32 take seconds each)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(SECTIONS),
                        help=f"sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("--publish", action="store_true",
                        help="also write bench/latest.md and bench/latest.png (committed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-minute load average to drop "
                             "below half the CPU count (other work skews every number)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.long_repeats is None:
        args.long_repeats = min(args.repeats, LONG_REPEATS)
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    enable_bytecode()
    if args.wait_idle:
        wait_until_idle(args.wait_idle)
    tmp = Path(tempfile.mkdtemp(prefix="alembic-sqlite-lock-bench-"))
    machine = describe(tmp)
    results = Results()
    bench = cases.Bench(tmp=tmp, repeats=args.repeats, results=results, say=say)
    started = time.monotonic()
    sections: dict[str, Callable[[], None]] = {
        "start": lambda: cases.cold_and_warm(bench, ALL, args.ns, {
            STOCK.name: sorted(set(args.ns) | set(args.warm_ns)),
            FILELOCK.name: args.warm_ns, OURS.name: args.warm_ns}),
        "lock-ready": lambda: cases.lock_ready(bench, args.ready_ns),
        "cli": lambda: cases.command_line(bench),
        "chain": lambda: cases.long_chain(bench, args.chain),
        "long": lambda: cases.heavy_chain(bench, args.long_ns, repeats=args.long_repeats),
        "handoff": lambda: handoff.measure(bench),
        "mlflow": lambda: cases.mlflow_chain(bench, args.long_ns, repeats=args.long_repeats),
    }
    titles = {
        "start": f"cold start N={args.ns}, warm start N={args.warm_ns}, "
                 f"{args.repeats} repeats",
        "lock-ready": f"framework set-up in migration_lock(ready=) at head, N={args.ready_ns}",
        "cli": "command line",
        "chain": f"long chain {args.chain}",
        "long": f"{cases.LONG_LENGTH}-revision chain importing an application, "
                f"N={args.long_ns}, {args.long_repeats} repeats",
        "handoff": "hand-off",
        "mlflow": f"MLflow's chain, warm, N={args.long_ns}, {args.long_repeats} repeats",
    }
    took: dict[str, float] = {}
    try:
        for name in SECTIONS:
            if name in args.only:
                say(titles[name])
                section_started = time.monotonic()
                sections[name]()
                took[name] = time.monotonic() - section_started
                say(f"  {name}: {took[name]:.0f} s")
    finally:
        if args.keep:
            say(f"projects and the worker log kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    machine.append(("Load average at the end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    text = render(machine, results, args, elapsed, took)
    print(text)
    write(args.out, text, results, machine, publish=args.publish)
    return 0


def enable_bytecode() -> None:
    """Let workers use and write .pyc files, as a normal installation does.

    With PYTHONDONTWRITEBYTECODE set (some sandboxes and containers set it), every
    worker would compile env.py, each revision file and, on the command line, every
    module of an editable install, again: a cost of the environment, not of migrating.
    The unmeasured first round writes the .pyc files.
    """
    sys.dont_write_bytecode = False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def wait_until_idle(limit_s: float) -> None:
    idle = (os.cpu_count() or 1) / 2
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= idle and time.monotonic() < deadline:
        say(f"waiting for the machine to be idle: load {os.getloadavg()[0]:.2f}")
        time.sleep(10)


def render(machine: list[tuple[str, str]], results: Results, args: argparse.Namespace,
           elapsed_s: float, took: dict[str, float]) -> str:
    long_repeats = ("" if args.long_repeats == args.repeats or not
                    {"long", "mlflow"} & set(took) else
                    f" ({args.long_repeats} for the long and MLflow chains)")
    sections = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in took.items())
    parts = ["## Machine", "", *(f"- {key}: {value}" for key, value in machine), "",
             f"{args.repeats} repeats{long_repeats}{' (--quick)' if args.quick else ''}; "
             f"the whole run took {elapsed_s:.0f} s ({sections}).", "", "## Results", "",
             report.LEGEND, "", report.markdown_table(results), ""]
    slopes = report.per_revision(results)
    if slopes:
        parts += ["Cost per revision (long chain, one worker):", "", *slopes, ""]
    ready = report.ready_ratios(results)
    if ready:
        parts += ["Set-up at head, migration_lock(ready=) ÷ the same set-up with no lock "
                  "(median ÷ median; median of the per-repeat ratios; CPU per worker):", "",
                  *ready, ""]
    errors = report.error_kinds(results)
    if errors:
        parts += ["Why workers failed:", "", *errors, ""]
    return "\n".join(parts)


def write(out: Path, text: str, results: Results, machine: list[tuple[str, str]], *,
          publish: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    title = f"{machine[0][1]}; Python {machine[2][1]}, SQLite {machine[3][1]}"
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps(
        {"machine": dict(machine), "series": [s.as_dict() for s in results.all()]}, indent=1))
    has_plot = any(s.case in report.PLOTTED for s in results.all())
    if has_plot:
        report.plot(results, out / "bench.png", title)
    say(f"wrote {out / 'bench.md'}" + (f" and {out / 'bench.png'}" if has_plot else ""))
    if publish:
        latest = REPO / "bench"
        (latest / "latest.md").write_text(text)
        if has_plot:
            shutil.copy(out / "bench.png", latest / "latest.png")
        say(f"published {latest / 'latest.md'}")
