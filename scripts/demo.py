"""The demo: N workers run `alembic upgrade head` on one fresh SQLite file at once.

    make demo            # 8 workers
    python scripts/demo.py --workers 32

Each worker is a real `alembic` process; all are released at the same instant.
The demo prints what every worker did and the final state of the database.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import tempfile
from pathlib import Path

from workers import make_project, run_together

LINE = re.compile(r"\[pid (\d+)\] (.*)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="alembic-sqlite-lock-demo-") as tmp:
        ini = make_project(Path(tmp))
        db = Path(tmp, "app.db")
        print(f"{args.workers} workers run `alembic upgrade head` on the fresh file {db},")
        print("all released at the same instant.\n")
        results = run_together([["alembic", "-c", str(ini), "upgrade", "head"]]
                               * args.workers, cwd=Path(tmp))

        for number, result in enumerate(results, 1):
            lines = [m.group(2) for m in map(LINE.search, result.stderr.splitlines()) if m]
            applied = [line.split(": ", 1)[1] for line in lines
                       if line.startswith("Applied migration")]
            if applied:
                did = f"applied {len(applied)} migrations: {' '.join(applied)}"
            elif any("already applied by another worker" in line for line in lines):
                did = "waited for the lock, then found the work done by another worker"
            elif any("nothing to do" in line for line in lines):
                did = "found the database already at head (no lock taken)"
            else:
                did = "did something unexpected:\n" + result.stderr
            print(f"worker {number:2} (pid {result.pid}) exit {result.returncode}: {did}")
            for line in lines:
                if not line.startswith("Applying"):
                    print(f"      {line}")

        with sqlite3.connect(db) as conn:
            version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            audit = conn.execute("SELECT count(*) FROM data_migrations").fetchone()[0]
            tags = conn.execute("SELECT count(*) FROM tags").fetchone()[0]
        conn.close()
        failed = sum(r.returncode != 0 for r in results)
        print(f"\nFinal revision: {', '.join(v for (v,) in version)}; the data migration "
              f"0005 ran {audit} time(s) and seeded {tags} tags; {failed} worker(s) failed.")
        ok = failed == 0 and audit == 1 and tags == 3
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
