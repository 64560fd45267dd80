"""``upgrade_async()``: the start-up upgrade for async apps (a FastAPI or Starlette lifespan).

The migration itself stays synchronous (pysqlite, whatever driver the app uses: see
``_sqlite.migration_url``). It runs in a worker thread, so the event loop keeps serving
its other tasks while this worker migrates or waits for another worker's lock, and no
``asyncio.run()`` is ever called inside the app's running loop. Threads of one process
are serialized by ``upgrade()``'s process-wide mutex, so concurrent calls are safe.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._commands import ConfigLike, upgrade


async def upgrade_async(config: ConfigLike, revision: str = "head", **settings: Any) -> list[str]:
    """Await :func:`upgrade` without blocking the event loop; same arguments, same result.

    ``settings`` are passed on as they are (``deadline_s=300``, ``sql=True``, ``tag=...``).
    Cancelling the awaiting task does not stop a migration that has started: the thread
    finishes it (committing or rolling back as a whole) and the result is discarded.
    """
    return await asyncio.to_thread(upgrade, config, revision, **settings)
