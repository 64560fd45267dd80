"""``upgrade_async()``: the start-up upgrade for async apps (a FastAPI or Starlette lifespan).

The migration itself stays synchronous (pysqlite, whatever driver the app uses: see
``_sqlite.migration_url``). It runs in a worker thread, so the event loop keeps serving
its other tasks while this worker migrates or waits for another worker's lock, and no
``asyncio.run()`` is ever called inside the app's running loop. Threads of one process
are serialized by ``upgrade()``'s process-wide mutex, so concurrent calls are safe.
"""

from __future__ import annotations

import asyncio
import sys

from ._commands import ConfigLike, upgrade
from ._settings import SettingsKeywords

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # SQLAlchemy 2 depends on typing_extensions
    from typing_extensions import Unpack


async def upgrade_async(
    config: ConfigLike,
    revision: str = "head",
    *,
    sql: bool = False,
    tag: str | None = None,
    **settings: Unpack[SettingsKeywords],
) -> list[str]:
    """Await :func:`upgrade` without blocking the event loop; same arguments, same result.

    ``sql``, ``tag`` and the settings (``deadline_s=300``...) are passed on as they are.
    Cancelling the awaiting task does not stop a migration that has started: the thread
    finishes it (committing or rolling back as a whole) and the result is discarded.
    """
    return await asyncio.to_thread(upgrade, config, revision, sql=sql, tag=tag, **settings)
