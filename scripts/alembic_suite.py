"""Alembic's own test suite, stock and through alembic_sqlite_lock.run_migrations().

    make test-alembic-suite
    python scripts/alembic_suite.py [--workers 2] [-- PYTEST_ARGS...]

Downloads the sdist of the alembic installed in this interpreter (once, into
.cache/alembic-suite/), unpacks it twice and runs Alembic's SQLite test files in each
copy with pytest-xdist: once as they are, and once with every env.py that Alembic's test
helpers write rewritten into the one-call form (tests/alembic_suite/: the rewrite, and
the pytest plugin that applies it to the helpers). Then it compares the two runs test by
test and fails, listing them, when a test that passes stock does not pass through the
library. Tests that fail both ways (the post-write hook tests need `black`, which is not
installed) are listed, not failed.

Run it with the interpreter whose alembic, SQLAlchemy and alembic_sqlite_lock are to be
tested (`make test-alembic-suite`: .venv, with this checkout installed editable; pytest
and pytest-xdist must be there). Each run's pytest output and JUnit XML are kept in
.cache/alembic-suite/run/alembic-<version>/; the unpacked copies too when the check fails
(they are removed when it passes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "tests" / "alembic_suite"
CACHE = ROOT / ".cache" / "alembic-suite"

# Alembic's tests that run its commands, env.py files, revision scripts and autogenerate
# against SQLite. The others render other dialects' SQL (test_mssql, test_mysql,
# test_oracle, test_postgresql), test pieces with no environment (test_op, test_revision,
# test_dispatch, test_editor, ...) or are the suite third-party dialects run (test_suite).
TEST_FILES = (
    "tests/test_autogen_*.py",
    "tests/test_batch.py",
    "tests/test_command.py",
    "tests/test_config.py",
    "tests/test_environment.py",
    "tests/test_offline_environment.py",
    "tests/test_post_write.py",
    "tests/test_script_consumption.py",
    "tests/test_script_production.py",
    "tests/test_sqlite.py",
    "tests/test_version_table.py",
    "tests/test_version_traversal.py",
)

RUNS = {"stock": "stock", "one-call": "through the library"}

# Outcomes from best to worst; a test reported more than once keeps its worst.
OUTCOMES = ("passed", "skipped", "failed", "error")
SHOWN = ("passed", "failed", "error", "skipped")
MESSAGE_CHARS = 600


@dataclass
class Run:
    name: str
    returncode: int
    seconds: float
    results: dict[str, tuple[str, str]] = field(default_factory=dict)
    """test id -> (outcome, first line of the failure's message)"""

    def count(self, outcome: str) -> int:
        return sum(result == outcome for result, _ in self.results.values())

    def summary(self) -> str:
        counts = [f"{self.count(outcome)} {outcome}" for outcome in SHOWN
                  if self.count(outcome) or outcome in ("passed", "failed")]
        return f"{', '.join(counts)} ({self.seconds:.0f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist -n (default 2)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args()

    version = metadata.version("alembic")
    sqlalchemy = metadata.version("sqlalchemy")
    started = time.monotonic()
    sdist = download(version)
    print(f"Alembic {version}'s test suite (SQLAlchemy {sqlalchemy}), from {rel(sdist)}")

    work = CACHE / "run" / f"alembic-{version}"
    runs = {}
    for name in RUNS:
        copy = unpack(sdist, work / name)
        runs[name] = run_suite(name, copy, work, args.workers, args.pytest_args)
    failed = report(runs["stock"], runs["one-call"], read_rewrites(work), work)
    if not failed:
        for name in RUNS:
            shutil.rmtree(work / name / f"alembic-{version}", ignore_errors=True)
    print(f"\nTotal {time.monotonic() - started:.0f} s; pytest output in {rel(work)}/")
    return 1 if failed else 0


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def download(version: str) -> Path:
    """The sdist of ``alembic==version`` from the package index, cached."""
    sdist = CACHE / f"alembic-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"Downloading the alembic {version} sdist into {rel(CACHE)}/ ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--no-binary", ":all:", f"alembic=={version}", "--dest", str(CACHE)],
        check=True,
    )
    if not sdist.is_file():
        sys.exit(f"pip download left no {sdist.name} in {CACHE}")
    return sdist


def unpack(sdist: Path, into: Path) -> Path:
    """A fresh copy of the sdist (a run leaves scratch folders and .pyc files behind)."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(into, filter="data")
        else:  # Python < 3.10.12 / 3.11.4
            archive.extractall(into)  # the sdist pip just downloaded from the index
    (top,) = into.iterdir()
    return top


def rewrite_log(work: Path) -> Path:
    return work / "rewrites.jsonl"


def run_suite(name: str, copy: Path, work: Path, workers: int, pytest_args: list[str]) -> Run:
    files = sorted(str(path.relative_to(copy)) for pattern in TEST_FILES
                   for path in copy.glob(pattern))
    junit = copy.parent / "junit.xml"
    command = [
        sys.executable, "-m", "pytest", "-n", str(workers), "-p", "no:cacheprovider",
        # Alembic's addopts stop at 100 failures; a broken run must still be compared whole.
        "--maxfail=1000000", f"--junitxml={junit}", *files, *pytest_args,
    ]
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    if name == "one-call":
        command[3:3] = ["-p", "one_call_plugin"]
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PLUGIN_DIR), *filter(None, [env.get("PYTHONPATH")])]
        )
        rewrite_log(work).unlink(missing_ok=True)
        env["ALEMBIC_SUITE_REWRITE_LOG"] = str(rewrite_log(work))
    log = work / f"{name}.log"
    print(f"Running {len(files)} test files {RUNS[name]} (pytest -n {workers}) ...", flush=True)
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        returncode = subprocess.run(
            command, cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode
    run = Run(name, returncode, time.monotonic() - started)
    if junit.is_file():
        run.results = read_junit(junit)
    return run


def read_junit(path: Path) -> dict[str, tuple[str, str]]:
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).iter("testcase"):
        module, _, cls = case.get("classname", "").partition(".")[2].partition(".")
        test_id = "::".join(filter(None, [f"tests/{module}.py", cls, case.get("name", "")]))
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                lines = (child.get("message") or child.text or "").strip().splitlines()
                message = lines[0] if lines else ""
                if len(message) > MESSAGE_CHARS:
                    message = message[:MESSAGE_CHARS] + " ..."
        previous = results.get(test_id)
        if previous is None or OUTCOMES.index(outcome) > OUTCOMES.index(previous[0]):
            results[test_id] = (outcome, message)
    return results


def read_rewrites(work: Path) -> list[dict[str, object]]:
    if not rewrite_log(work).is_file():
        return []
    with open(rewrite_log(work), encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def report(stock: Run, library: Run, rewrites: list[dict[str, object]], work: Path) -> bool:
    """Print the comparison; True when the check fails."""
    failed = False
    print(f"\n  stock:               {stock.summary()}")
    print(f"  through the library: {library.summary()}")
    for run in (stock, library):
        # 0: all passed, 1: some failed; anything else (interrupted, internal error,
        # usage error, nothing collected) means the run itself did not happen.
        if run.returncode not in (0, 1) or not run.results:
            print(f"FAILED: the {RUNS[run.name]} run exited {run.returncode} with "
                  f"{len(run.results)} results; see {rel(work / run.name)}.log")
            failed = True

    kinds: dict[str, int] = {}
    for record in rewrites:
        kinds[str(record["outcome"])] = kinds.get(str(record["outcome"]), 0) + 1
    print("  env.py files written by Alembic's test helpers in the library run: "
          + (", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"))
    if not kinds.get("one-call form"):
        print("FAILED: no env.py was rewritten into the one-call form: the library run "
              "did not go through run_migrations()")
        failed = True
    notes = sorted({str(note) for record in rewrites for note in list(record["notes"])})
    for note in notes:
        print(f"    note: {note}")

    both = sorted(test for test, (outcome, _) in stock.results.items()
                  if outcome in ("failed", "error")
                  and library.results.get(test, ("missing", ""))[0] != "passed")
    if both:
        print(f"\nFailing both ways ({len(both)}; reported, not a failure of this check):")
        for test in both:
            print(f"  {test}\n      {stock.results[test][1]}")

    differ = sorted(test for test, (outcome, _) in stock.results.items()
                    if outcome == "passed"
                    and library.results.get(test, ("missing", ""))[0] != "passed")
    if differ:
        failed = True
        print(f"\nFAILED: {len(differ)} test(s) pass stock but not through the library:")
        for test in differ:
            outcome, message = library.results.get(test, ("missing", "not in the run"))
            print(f"  {test}\n      {outcome}: {message}")

    only_library = sorted(test for test, (outcome, _) in library.results.items()
                          if outcome == "passed"
                          and stock.results.get(test, ("missing", ""))[0] != "passed")
    if only_library:
        print(f"\nPassing through the library only ({len(only_library)}; reported):")
        for test in only_library:
            outcome, message = stock.results.get(test, ("missing", "not in the run"))
            print(f"  {test}\n      stock {outcome}: {message}")

    if not failed:
        print("\nOK: every test that passes stock passes through the library.")
    return failed


if __name__ == "__main__":
    sys.exit(main())
