"""Checks for containers/test.sh; standard library only (runs on the host's python3).

    check.py health NAME=PORT... --workers 4 --deadline 120 --out pids.json
        wait until /health of every container answered 200 from WORKERS distinct pids
    check.py verify --pids pids.json --logs DIR --db FILE --versions DIR --workers 4
        logs, exactly-once migrations and the database; one PASS/FAIL line per check

Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

OUTCOME = re.compile(r"Applied migration|already applied by another worker|nothing to do")
APPLIED = re.compile(r"Applied migration: (\S+)")
# gunicorn.conf.py's format: "[date] [pid] [LEVEL] logger: message"
LINE = re.compile(r"\[(\d+)\] \[([A-Z]+)\] ([\w.]+): (.*)")
BOOTED = re.compile(r"Booting worker with pid: (\d+)")
READY = re.compile(r"Worker (\d+) ready at")
BAD = re.compile(r"Traceback|Worker failed to boot|exited with code|\[(ERROR|CRITICAL)\]"
                 r"|database is locked")


def get_health(port: int) -> tuple[int, int | None]:
    # hold: the handler sleeps briefly, so concurrent requests spread over the workers
    url = f"http://127.0.0.1:{port}/health?hold=0.3"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)["pid"]
    except urllib.error.HTTPError as error:  # 503: not at head
        return error.code, None
    except (OSError, ValueError):  # not listening yet, reset, bad body
        return 0, None


def health(args: argparse.Namespace) -> int:
    ports = dict(pair.split("=", 1) for pair in args.containers)
    answered: dict[str, set[int]] = {name: set() for name in ports}
    deadline = time.monotonic() + args.deadline
    with concurrent.futures.ThreadPoolExecutor(max_workers=4 * args.workers) as pool:
        while time.monotonic() < deadline:
            waiting = [n for n in ports if len(answered[n]) < args.workers]
            if not waiting:
                break
            for name in waiting:
                for status, pid in pool.map(get_health, [int(ports[name])] * 4 * args.workers):
                    if status == 200 and pid is not None:
                        answered[name].add(pid)
            time.sleep(0.5)
    Path(args.out).write_text(json.dumps({n: sorted(s) for n, s in answered.items()}))
    for name, pids in answered.items():
        print(f"{name} (port {ports[name]}): 200 from {len(pids)} worker pid(s) {sorted(pids)}")
    return 0 if all(len(s) >= args.workers for s in answered.values()) else 1


def revisions(versions: Path) -> tuple[list[str], set[str]]:
    revs, downs = [], set()
    for path in sorted(versions.glob("*.py")):
        text = path.read_text()
        rev = re.search(r"^revision\b[^=]*=\s*['\"]([^'\"]+)", text, re.M)
        down = re.search(r"^down_revision\b[^=]*=\s*['\"]([^'\"]+)", text, re.M)
        if rev:
            revs.append(rev.group(1))
        if down:
            downs.add(down.group(1))
    return revs, set(revs) - downs


def verify(args: argparse.Namespace) -> int:
    failed = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failed
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}: {what}")

    health_pids = {n: set(v) for n, v in json.loads(Path(args.pids).read_text()).items()}
    applied: Counter[str] = Counter()
    for name, answered in sorted(health_pids.items()):
        text = (Path(args.logs) / f"{name}.log").read_text(errors="replace")
        booted = {int(p) for p in BOOTED.findall(text)}
        ready = {int(p) for p in READY.findall(text)}
        bad = [line for line in text.splitlines() if BAD.search(line)]
        outcomes: dict[int, list[str]] = defaultdict(list)
        for pid, _level, logger, message in LINE.findall(text):
            if logger.startswith("alembic_sqlite_lock") and OUTCOME.search(message):
                outcomes[int(pid)].append(message)
        applied.update(APPLIED.findall(text))
        check(len(booted) == args.workers and ready == booted,
              f"{name}: {len(booted)} workers booted {sorted(booted)}, {len(ready)} ready")
        check(answered == booted, f"{name}: /health 200 from each booted worker {sorted(answered)}")
        check(not bad, f"{name}: no error lines" + "".join(f"\n    {b}" for b in bad[:5]))
        silent = sorted(booted - outcomes.keys())
        summary = ", ".join(f"{pid}: {msgs[-1]}" for pid, msgs in sorted(outcomes.items()))
        check(not silent, f"{name}: every worker logged its outcome ({summary})"
              + (f"; none from {silent}" if silent else ""))

    revs, heads = revisions(Path(args.versions))
    wrong = {rev: applied[rev] for rev in set(revs) | set(applied) if applied[rev] != 1}
    check(bool(revs) and not wrong,
          f"exactly one 'Applied migration: <rev>' per revision ({len(revs)} revisions,"
          f" {sum(applied.values())} lines)" + (f"; wrong counts {wrong}" if wrong else ""))

    try:
        db = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True, timeout=30)
        try:
            version = {row[0] for row in db.execute("SELECT version_num FROM alembic_version")}
            audit = db.execute("SELECT COUNT(*) FROM data_migrations").fetchone()[0]
            tags = db.execute("SELECT COUNT(*) FROM tags").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as error:
        check(False, f"database {args.db}: {error}")
        return 1
    check(version == heads, f"database at head {sorted(heads)}: {sorted(version)}")
    check(audit == 1 and tags == 3, f"data migration ran once: data_migrations={audit} (want 1),"
          f" tags={tags} (want 3)")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("health")
    h.add_argument("containers", nargs="+", metavar="NAME=PORT")
    h.add_argument("--workers", type=int, required=True)
    h.add_argument("--deadline", type=float, required=True)
    h.add_argument("--out", required=True)
    v = sub.add_parser("verify")
    for name in ("--pids", "--logs", "--db", "--versions"):
        v.add_argument(name, required=True)
    v.add_argument("--workers", type=int, required=True)
    args = parser.parse_args()
    return health(args) if args.command == "health" else verify(args)


if __name__ == "__main__":
    sys.exit(main())
