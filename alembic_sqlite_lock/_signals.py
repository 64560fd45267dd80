"""SIGTERM during a locked run: roll back and exit, instead of dying mid-transaction.

A process killed by SIGTERM's default action leaves a hot journal that the next worker
rolls back, so the database is safe either way; turning SIGTERM into ``SystemExit``
lets the run roll back itself, release its locks, log why, and exit with 143 (128 +
SIGTERM, what a shell reports for a TERM-killed process).

Only when nobody else cares: in the main thread (Python runs signal handlers there and
only there may install them) and when SIGTERM still has its default action. An app
server (gunicorn, uvicorn) that installed its own handler keeps it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit(143)`` (if SIGTERM is ours to take)."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def on_terminate(_signum: int, _frame: FrameType | None) -> None:
        # Restore the default first: a second SIGTERM during the rollback kills at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        logger.error("SIGTERM received during the migration run: rolling back and exiting")
        raise SystemExit(EXIT_CODE)

    signal.signal(signal.SIGTERM, on_terminate)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is on_terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
