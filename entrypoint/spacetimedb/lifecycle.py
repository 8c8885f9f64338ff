"""Everything that needs the database once SpacetimeDB answers: identity → publish → logs, ownership.

Runs beside the SpacetimeDB service (``startup.py`` starts both) and follows
its readiness::

    first ready → key modes tightened → publisher identity (cli.toml) → publish every module
                → modules ready (readiness may count on them)
                → for good, concurrently: each module's log followed; each module's ownership settled
                  (first-user auto-claim, looked at when the log says someone connected); after every
                  later restart, every module checked again

Only ``Fatal`` errors escape (a publish refused, SpacetimeDB unreachable past
its deadline); the followers and watchers log their own trouble and carry on.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from entrypoint.config import Settings
    from entrypoint.localhttp import AsyncClient
    from entrypoint.spacetimedb.credentials import Publisher
    from entrypoint.spacetimedb.service import SpacetimeService
    from entrypoint.supervision.status import Status


async def run(settings: Settings, status: Status, spacetime: SpacetimeService, modules_ready: asyncio.Event) -> None:
    """Publish once SpacetimeDB is first ready, set ``modules_ready``, then follow, watch and re-check."""
    # The imports below (~20-60 ms: h11, our HTTP client, the SpacetimeDB API modules) would otherwise sit
    # between SpacetimeDB answering and the publish, on the way to ready: they run in a thread while
    # SpacetimeDB starts instead, keeping the loop free for the children's output meanwhile.
    preload = asyncio.ensure_future(asyncio.to_thread(preload_api))
    await spacetime.first_ready.wait()
    await preload
    from entrypoint.localhttp import AsyncClient, Timeout
    from entrypoint.spacetimedb import ownership
    from entrypoint.spacetimedb.credentials import ensure_identity
    from entrypoint.spacetimedb.module_logs import follow_module_logs
    from entrypoint.spacetimedb.publish import publish_all
    from entrypoint.spacetimedb.server import tighten_key_modes

    # Plain HTTP/1.1 to SpacetimeDB on loopback (POGLY_SPACETIME_ADDR): our own small client, never TLS and
    # never a proxy (it reads no environment), so PID 1 carries no httpx, anyio or ssl (issue 15).
    async with AsyncClient(base_url=settings.spacetime_addr.url, timeout=Timeout(30.0, connect=5.0)) as client:
        tighten_key_modes(settings.config_dir)
        publisher = await ensure_identity(settings, client)
        status.publisher_identity = publisher.identity
        await publish_all(settings, status, client, publisher)
        modules_ready.set()
        # Each module's log rings its ownership watcher when someone connects: no SQL polling meanwhile.
        bells = {module: ownership.ConnectionBell() for module in settings.modules}
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(republish_after_restarts(settings, status, spacetime, client, publisher),
                              name="republish")
            for module in settings.modules:
                tasks.create_task(follow_module_logs(settings, client, publisher, module, listener=bells[module]),
                                  name=f"logs:{module}")
            for module in settings.modules:
                tasks.create_task(ownership.watch(settings, status, client, publisher, module, bell=bells[module]),
                                  name=f"ownership:{module}")


def preload_api() -> None:
    """Import what ``run`` needs once SpacetimeDB answers."""
    import importlib

    for name in ("entrypoint.localhttp", "entrypoint.spacetimedb.credentials", "entrypoint.spacetimedb.module_logs",
                 "entrypoint.spacetimedb.ownership", "entrypoint.spacetimedb.publish"):
        importlib.import_module(name)


async def republish_after_restarts(settings: Settings, status: Status, spacetime: SpacetimeService,
                                   client: AsyncClient, publisher: Publisher) -> None:
    """After SpacetimeDB restarts, make sure every module is still there.

    A crash within the server's 500 ms sync window can lose a database created
    just before it; ``publish_all`` skips what is present and unchanged, so
    this costs one identity lookup per module when nothing was lost.
    """
    from entrypoint.spacetimedb.publish import publish_all

    generation = spacetime.generation
    while True:
        generation = await spacetime.ready_after(generation)
        await publish_all(settings, status, client, publisher)
