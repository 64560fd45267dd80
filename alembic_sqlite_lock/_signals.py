"""SIGTERM during a locked run: roll back and exit, instead of dying mid-transaction.

A process killed by SIGTERM's default action leaves a hot journal that the next worker
rolls back, so the database is safe either way; turning SIGTERM into ``SystemExit``
lets the run roll back itself, release its locks, log what it left, and exit with 143
(128 + SIGTERM, what a shell reports for a TERM-killed process).

The handler only records the signal and raises; the run tells the :class:`Termination`
whether its COMMIT happened and where the database is, and the line logged on the way
out says so: "rolled back" for a run stopped before its COMMIT, "already committed"
for one stopped after it. Around the COMMIT itself the signal is held back, so that it
lands cleanly before or after it, never inside SQLAlchemy's bookkeeping of it.

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


class Termination:
    """What the locked run knows when a SIGTERM stops it."""

    def __init__(self) -> None:
        self.received = False
        """A SIGTERM arrived (only ever True while our handler is installed)."""
        self.committed = False
        """The run's COMMIT returned: the migration is in the database."""
        self.heads: str | None = None
        """Where the database is after the stop, once read: "0009", "base (no revision)"."""
        self._holding = False
        self._held = False

    @contextmanager
    def held(self) -> Iterator[None]:
        """While inside, a SIGTERM is recorded but waits; it stops the run on leaving.

        A Python-level hold rather than ``pthread_sigmask``: with another thread running,
        the kernel may hand the signal to that thread and Python still runs the handler
        in the main thread at once.
        """
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._held:
                self._held = False
                raise SystemExit(EXIT_CODE)

    def on_signal(self) -> None:
        self.received = True
        if self._holding:
            self._held = True
            return
        raise SystemExit(EXIT_CODE)

    def log(self) -> None:
        if self.committed:
            logger.error(
                "SIGTERM received after the migration was committed (the database is at "
                "%s): exiting",
                self.heads or "its new revision",
            )
        else:
            logger.error(
                "SIGTERM received during the migration run: rolled back; the database is "
                "at %s; exiting",
                self.heads or "the revision it had before this run",
            )


@contextmanager
def terminate_as_exit() -> Iterator[Termination]:
    """While inside, SIGTERM raises ``SystemExit(143)`` (if SIGTERM is ours to take)."""
    stop = Termination()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield stop
        return

    def on_terminate(_signum: int, _frame: FrameType | None) -> None:
        # Restore the default first: a second SIGTERM during the rollback kills at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop.on_signal()

    signal.signal(signal.SIGTERM, on_terminate)
    try:
        yield stop
    except SystemExit:
        if stop.received:
            stop.log()
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is on_terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
