"""``pogly-entrypoint run``, top to bottom: the one place that knows the order of everything.

::

    __main__   SIGTERM/SIGINT handlers first (a signal to PID 1 without one is lost); caught ones replayed below
    cli        settings: every problem at once → exit 78, before anything starts
    run()      ── no asyncio yet: SpacetimeDB takes longest to be ready and need not wait ~80 ms for imports ──
      ├─ become the reaper: PID 1 by nature, else PR_SET_CHILD_SUBREAPER
      ├─ SpacetimeDB spawned (prespawn; skipped when a signal already came or a volume looks unusable)
      ├─ the `oidc-check` helper spawned too (its imports overlap ours; skipped with OIDC off or any doubt)
      └─ logging → event loop
    serve()    ── in the loop ──
      ├─ reaper (the one waitpid, SIGCHLD) → services → supervisor → signal handlers (+ the caught ones)
      ├─ Supervisor.run:
      │    first: the three directories writable (else exit 78 naming the one)
      │    then, all concurrently:
      │    ├─ SpacetimeDB: adopt the prespawned run → lock held? wait it out (POGLY_LOCK_WAIT)
      │    │              → /v1/ping ready → restart policy
      │    ├─ Caddy: config.js → which web build (webapp.detected) → render → caddy validate (cached)
      │    │         → run → ready → restart policy (exit 1 before ready: fatal)
      │    ├─ OIDC verdict: the `oidc-check` process (adopted if prespawned; its answer read as soon as it
      │    │               is printed; fatal if wrong; unreachable → "unverified", re-checked);
      │    │               OIDC off (both variables empty) → "disabled", nothing checked
      │    ├─ lifecycle: once SpacetimeDB is ready → identity → publish → module logs, ownership,
      │    │             and every module re-checked after each SpacetimeDB restart
      │    ├─ "ready" once SpacetimeDB, Caddy, the modules and the OIDC verdict are (/readyz 200)
      │    └─ health server (/livez, /readyz, /status on POGLY_HEALTH_ADDR), started last
      │    SIGTERM/SIGINT or the first fatal error → stop: all of the above cancelled (nothing restarts)
      │         ∥ /readyz 503 → Caddy SIGTERM (its grace) → SpacetimeDB SIGINT (the rest of POGLY_STOP_TIMEOUT)
      │         (a second signal: SIGKILL at once) → as PID 1, stragglers swept
      └─ health server closed → entrypoint.exit → stdout flushed → os._exit(code)

Exit code: 0 on request, else the first fatal error's (78 configuration, 69
unavailable, a crash-looping child's own code, 1 for Caddy's failed start),
70 for a bug.  The supervision itself (task group, restart policy, ordered
stop) is generic and lives in ``supervision/``; this module only decides what
runs and in which order.

Only ``os``, ``sys`` and modules without asyncio are imported at the top: this
module is on the start path (``cli → config → supervision.spawn →
spacetimedb.server``); everything else is imported in ``serve``.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, Fatal
from entrypoint.oidc import helper as oidc_helper
from entrypoint.spacetimedb.server import prespawn
from entrypoint.supervision.spawn import become_subreaper
from entrypoint.version import __version__

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from entrypoint.config import Settings
    from entrypoint.oidc.helper import Spawned
    from entrypoint.supervision.status import Status
    from entrypoint.web.health import HealthServer

Early = tuple[int, int, int, float]  # a child spawned before the loop: pid, stdout, stderr, wall-clock time


def run(settings: Settings, pending: list[tuple[int, float]]) -> NoReturn:
    """Before the event loop: become the reaper, spawn SpacetimeDB, set up logging; then ``serve``."""
    # No TLS in PID 1 (issue 15): it only speaks plain HTTP/1.1 to loopback (SpacetimeDB, our health server,
    # through entrypoint/localhttp.py), yet asyncio imports ssl anyway (CPython 3.11 Lib/asyncio/base_events.py,
    # sslproto.py, selector_events.py: `try: import ssl except ImportError: ssl = None`): 4.3 MB resident for
    # the container's life.  A None entry makes that import fail, so asyncio runs without TLS support.  What
    # would break: importing ssl or httpx anywhere in this process (ImportError), asking asyncio for ssl= or
    # start_tls, an https:// URL through http.client/urllib (they import ssl the same guarded way).  The OIDC
    # check, the one TLS client, runs in the separate `oidc-check` process (its own interpreter, unaffected).
    # setdefault: when something already loaded ssl, leave it be.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    # The same for OpenSSL's hashes: with ssl gone, `hashlib` alone would map libcrypto for `_hashlib` (3.4 MB,
    # issue 15's table).  Without it hashlib uses CPython's built-in sha256 (Lib/hashlib.py falls back to
    # `_sha256`, `_sha512`, … when `import _hashlib` fails), which is all PID 1 hashes with (stamps, the
    # module's sha256, backup manifests; blake3 is its own package); slower per byte, but PID 1 hashes little.
    sys.modules.setdefault("_hashlib", None)  # type: ignore[arg-type]
    # Adopt orphans before the first child exists (PID 1 does so by nature).
    role = "pid1" if os.getpid() == 1 else ("subreaper" if become_subreaper() else "none")
    # SpacetimeDB first: it takes longest to be ready, and asyncio, structlog and
    # the supervisor cost ~80 ms of imports that it need not wait for.
    early = None if pending else prespawn(settings)
    # Then the OIDC check: its helper spends ~150 ms importing, better beside our imports than after them.
    oidc_early = None if pending else oidc_helper.prespawn(settings)
    import asyncio

    from entrypoint import logs

    logs.configure(settings.log_format, settings.debug_mode, level=settings.log_level)
    asyncio.run(serve(settings, pending, early, role, oidc_early))
    raise AssertionError("serve() exits the process")  # pragma: no cover


async def serve(settings: Settings, pending: list[tuple[int, float]], early: Early | None, role: str,
                oidc_early: Spawned | None = None) -> NoReturn:
    """The event loop's part of the story: supervise until stopped, then exit at once."""
    import asyncio
    import signal

    from entrypoint import control, logs
    from entrypoint.oidc import verdict
    from entrypoint.spacetimedb import lifecycle
    from entrypoint.spacetimedb.service import SpacetimeService
    from entrypoint.supervision.process import Reaper
    from entrypoint.supervision.status import ModuleStatus, Status
    from entrypoint.supervision.supervisor import Supervisor
    from entrypoint.web.caddy_service import CaddyService

    log = logs.get()
    log.info("entrypoint.start", version=__version__, pid=os.getpid(), reaper=role,
             issuer=settings.oidc_issuer, client_id=settings.oidc_client_id, modules=list(settings.modules))
    if role == "none":
        log.warning("entrypoint.no_reaper", message="not PID 1 and PR_SET_CHILD_SUBREAPER failed: "
                    "orphans of our children will not be reaped by us")
    loop = asyncio.get_running_loop()
    prespawned = [child for child in (early and early[0], oidc_early and oidc_early.pid) if child]
    reaper = Reaper(expected=tuple(prespawned))  # theirs are not orphans' exits, whenever they come
    reaper.install(loop)

    status = Status()
    status.modules.update({m: ModuleStatus(m) for m in settings.modules})
    spacetime = SpacetimeService(settings, status, reaper)
    caddy = CaddyService(settings, status, reaper)
    if early is not None:
        spacetime.adopt(early)  # from here on a stop stops it, whenever it comes
    supervisor = Supervisor(status, [spacetime, caddy], reaper, stop_timeout=settings.stop_timeout)
    oidc_prespawned = verdict.Prespawned(oidc_early) if oidc_early is not None else None

    def request_stop(sig: int, at: float | None = None) -> None:
        if oidc_prespawned is not None:
            oidc_prespawned.drop()  # a stop before the OIDC check began: the prespawned helper goes at once
        supervisor.request_stop(sig, at=at)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig)
    for sig, at in pending:  # caught by __main__ before the loop existed; the budget counts from then
        request_stop(sig, at=at)
    pending.clear()

    def first() -> None:
        try:
            prepare_dirs(settings)
        except Fatal:
            if oidc_prespawned is not None:
                oidc_prespawned.drop()  # nothing else starts, the OIDC check included
            raise

    modules_ready, oidc_checked = asyncio.Event(), asyncio.Event()
    health = Health(settings, status, refresh=spacetime.check_answering)
    code = await supervisor.run(
        first=first,
        jobs={
            "oidc": lambda: verdict.settle(settings, status, reaper, oidc_checked, early=oidc_prespawned),
            "lifecycle": lambda: lifecycle.run(settings, status, spacetime, modules_ready),
            # `pogly-entrypoint backup` pauses SpacetimeDB through it (entrypoint/control.py).
            "control": lambda: control.ControlServer(control.socket_path(settings.run_dir), status,
                                                     {"spacetimedb": spacetime}, ready=modules_ready,
                                                     start_timeout=settings.start_timeout).serve(),
            # Last: tasks take their first step in creation order, so both children (and the caddy
            # validate / oidc-check helpers) are spawned before the health server's imports.
            "health": health.start,
        },
        ready_when=(modules_ready, oidc_checked),
        ready_fields=lambda: {"oidc": status.oidc, "url": f"http://127.0.0.1:{settings.http_port}/",
                              "modules": list(settings.modules)},
    )
    await health.close()
    log.info("entrypoint.exit", exit_code=code, orphans_reaped=reaper.orphans_reaped,
             uptime_s=round(supervisor.clock() - supervisor.launched, 3))
    # Every child is gone and every file was written atomically: skip the
    # interpreter's teardown (~150 ms of module finalisation) and exit now.
    # os._exit skips atexit, so hand what a slow log reader has not taken yet to it first (bounded).
    logs.flush(1.0)
    sys.stderr.flush()
    os._exit(code)


def prepare_dirs(settings: Settings) -> None:
    """The three directories exist and are writable, or exit 78 naming the one that is not."""
    for var, path, mode in (("POGLY_RUN_DIR", settings.run_dir, 0o755), ("POGLY_DATA_DIR", settings.data_dir, 0o700),
                            ("POGLY_CONFIG_DIR", settings.config_dir, 0o700)):
        try:
            path.mkdir(parents=True, exist_ok=True, mode=mode)
            probe = path / f".pogly-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise Fatal(EXIT_CONFIG, f"{var}={path} is not a writable directory ({exc.strerror}); "
                        "mount a writable volume there or point the variable elsewhere",
                        event="config.dir_unwritable") from exc


class Health:
    """The health server: started last in the task group, closed last, so probes see the whole shutdown."""

    def __init__(self, settings: Settings, status: Status,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.status = status
        self.refresh = refresh  # asked before /readyz, /status and /metrics: is a ready SpacetimeDB still answering?
        self.server: HealthServer | None = None

    async def start(self) -> None:
        from entrypoint.web.health import HealthServer

        addr = self.settings.health_addr
        server = HealthServer(self.status, addr.host, addr.port, refresh=self.refresh)
        try:
            await server.start()
        except OSError as exc:
            raise Fatal(EXIT_UNAVAILABLE, f"cannot listen on POGLY_HEALTH_ADDR={addr}: {exc}; "
                        "choose a free loopback port", event="health.listen_failed") from exc
        self.server = server

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

