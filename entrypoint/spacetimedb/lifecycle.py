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
    import httpx

    from entrypoint.config import Settings
    from entrypoint.spacetimedb.credentials import Publisher
    from entrypoint.spacetimedb.service import SpacetimeService
    from entrypoint.supervision.status import Status


async def run(settings: Settings, status: Status, spacetime: SpacetimeService, modules_ready: asyncio.Event) -> None:
    """Publish once SpacetimeDB is first ready, set ``modules_ready``, then follow, watch and re-check."""
    # The HTTP client's imports (~50 ms, more on a busy machine) sat between SpacetimeDB answering and
    # the publish, on the way to ready: they run in a thread while SpacetimeDB starts instead.
    preload = asyncio.ensure_future(asyncio.to_thread(preload_http_client))
    await spacetime.first_ready.wait()
    await preload
    import httpx

    from entrypoint.spacetimedb import ownership
    from entrypoint.spacetimedb.credentials import ensure_identity
    from entrypoint.spacetimedb.module_logs import follow_module_logs
    from entrypoint.spacetimedb.publish import publish_all
    from entrypoint.spacetimedb.server import tighten_key_modes

    # Plain HTTP to SpacetimeDB on loopback (POGLY_SPACETIME_ADDR), never TLS and never through a proxy:
    # verify=False spares PID 1 loading certifi's CA bundle (1.2 MB resident for its whole life, issue 15),
    # trust_env=False keeps a cluster-wide HTTP_PROXY from routing 127.0.0.1 through a proxy.
    async with httpx.AsyncClient(base_url=settings.spacetime_addr.url, timeout=httpx.Timeout(30.0, connect=5.0),
                                 verify=False, trust_env=False) as client:
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


def preload_http_client() -> None:
    """Import httpx and what it would otherwise import lazily on the first request (httpcore's anyio backend)."""
    import anyio._backends._asyncio  # noqa: F401
    import httpcore._backends.anyio  # noqa: F401
    import httpx  # noqa: F401


async def republish_after_restarts(settings: Settings, status: Status, spacetime: SpacetimeService,
                                   client: httpx.AsyncClient, publisher: Publisher) -> None:
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
