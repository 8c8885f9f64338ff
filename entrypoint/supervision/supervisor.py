"""The order of things, top to bottom: start, get ready, serve, stop.

::

    signals ─► request_stop()            (handlers only set events)
    run()
      ├─ _main() in a TaskGroup, all concurrently:
      │    ├─ SpacetimeDB: start → lock held? wait it out → /v1/ping ready → restart policy
      │    ├─ Caddy: config.js → which web build (webapp.detected) → render → caddy validate (cached)
      │    │         → run → ready → restart policy
      │    ├─ OIDC: `oidc-check` process (fatal if wrong; unreachable → "unverified", re-checked);
      │    │         OIDC off (both variables empty) → "disabled", nothing checked
      │    ├─ lifecycle: once SpacetimeDB is ready → identity → publish → module logs, ownership,
      │    │             and a re-check of every module after each SpacetimeDB restart
      │    ├─ announce "ready" once SpacetimeDB, Caddy, the modules and the OIDC verdict are
      │    └─ health server (/livez, /readyz, /status on POGLY_HEALTH_ADDR), started last
      └─ on stop or fatal: no more restarts; cancel _main and, meanwhile, _shutdown():
           /readyz 503 → Caddy SIGTERM (its grace) → SpacetimeDB SIGINT (rest of the budget)
           → wait for _main's helpers to be gone → as PID 1, sweep stragglers → exit

Nothing else in the package knows this order.  A signal at any instant only
sets ``_stop``; whatever ``_main`` was doing is cancelled at its next await,
and ``_shutdown`` stops exactly the children that exist at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from entrypoint import logs
from entrypoint.config import Settings
from entrypoint.errors import EXIT_CONFIG, EXIT_SOFTWARE, EXIT_UNAVAILABLE, Fatal
from entrypoint.spacetimedb.service import SpacetimeService
from entrypoint.supervision import status as state
from entrypoint.supervision.process import Reaper, Spawner, spawn
from entrypoint.supervision.service import Service
from entrypoint.web.caddy_service import CaddyService

log = logs.get("supervisor")
STOP_MARGIN = 0.5  # seconds kept back from POGLY_STOP_TIMEOUT for our own exit
OIDC_DISABLED_MESSAGE = (
    "OIDC_ISSUER and OIDC_CLIENT_ID are both empty: sign-in is off (anonymous mode). The web app connects "
    "with anonymous SpacetimeDB identities, no OIDC provider is checked, and nobody becomes a database's "
    "owner by signing in first; `pogly-entrypoint owner set --identity <hex>` gives a database its owner. "
    "Set both variables to turn sign-in on."
)


class Supervisor:
    def __init__(self, settings: Settings, reaper: Reaper, *, clock: Callable[[], float] = time.monotonic,
                 spawner: Spawner = spawn, early_spacetime: tuple[int, int, int, float] | None = None) -> None:
        self.settings = settings
        self.reaper = reaper
        self.clock = clock
        self.status = state.Status()
        self.spacetime = SpacetimeService(settings, self.status, reaper, clock=clock, spawner=spawner)
        self.caddy = CaddyService(settings, self.status, reaper, clock=clock, spawner=spawner)
        if early_spacetime is not None:  # spawned before the event loop: see spacetime.prespawn
            self.spacetime.adopt(early_spacetime)
        self.stop_order: list[Service] = [self.caddy, self.spacetime]
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._modules_ready = asyncio.Event()
        self._oidc_checked = asyncio.Event()
        self._exit_code = 0
        self._launched = clock()
        self._health: Any = None

    # -- signals -----------------------------------------------------------------
    def request_stop(self, signum: int) -> None:
        """Signal handler: only records intent (uvicorn's "signals only enqueue")."""
        name = signal.Signals(signum).name
        if not self._stop.is_set():
            log.info("signal.received", signal=name, action="stopping")
            self._stop.set()
        elif not self._force.is_set():
            log.warning("signal.received", signal=name, action="second signal: skipping remaining graces, SIGKILL now")
            self._force.set()

    # -- main ------------------------------------------------------------------------
    async def run(self) -> int:
        main = asyncio.create_task(self._main(), name="main")
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for service in self.stop_order:
            service.stopping = True  # no restart from here on, whatever the cancelled tasks were doing
        if not main.done():
            main.cancel()
        await self._shutdown()  # concurrently with main's cancellation: exit as soon as children are gone
        with contextlib.suppress(asyncio.CancelledError):
            await main  # its short-lived helpers (caddy validate, oidc-check) are killed and reaped by now
        if os.getpid() == 1:
            self._kill_stragglers()
        if self._health is not None:
            await self._health.close()
        log.info("entrypoint.exit", exit_code=self._exit_code, orphans_reaped=self.reaper.orphans_reaped,
                 uptime_s=round(self.clock() - self._launched, 3))
        return self._exit_code

    async def _serve_health(self) -> None:
        """Start /livez, /readyz, /status; it outlives _main so probes see the whole shutdown."""
        from entrypoint.web.health import HealthServer

        server = HealthServer(self.status, self.settings.health_addr.host, self.settings.health_addr.port)
        try:
            await server.start()
        except OSError as exc:
            raise Fatal(EXIT_UNAVAILABLE, f"cannot listen on POGLY_HEALTH_ADDR={self.settings.health_addr}: "
                        f"{exc}; choose a free loopback port", event="health.listen_failed") from exc
        self._health = server

    async def _main(self) -> None:
        try:
            self._prepare_dirs()
            self.status.modules.update({m: state.ModuleStatus(m) for m in self.settings.modules})
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.spacetime.supervise(), name="spacetimedb")
                tasks.create_task(self.caddy.supervise(), name="caddy")
                tasks.create_task(self._oidc(), name="oidc")
                tasks.create_task(self._lifecycle(), name="lifecycle")
                tasks.create_task(self._announce_ready(), name="ready")
                # Last: tasks take their first step in creation order, so both children (and the
                # caddy validate / oidc-check helpers) are spawned before the health server's imports.
                tasks.create_task(self._serve_health(), name="health")
        except* Fatal as group:
            self._fail(group.exceptions[0])  # type: ignore[arg-type]
        except* Exception as group:
            for exc in group.exceptions:
                log.error("entrypoint.internal_error", error=repr(exc), exc_info=exc)
            self._exit_code = EXIT_SOFTWARE
        self._stop.set()

    def _fail(self, fatal: Fatal) -> None:
        if self._exit_code == 0:
            self._exit_code = fatal.exit_code
        log.error(fatal.event, message=fatal.message, exit_code=fatal.exit_code, **fatal.fields)
        self._stop.set()

    def _prepare_dirs(self) -> None:
        s = self.settings
        for var, path, mode in (("POGLY_RUN_DIR", s.run_dir, 0o755), ("POGLY_DATA_DIR", s.data_dir, 0o700),
                                ("POGLY_CONFIG_DIR", s.config_dir, 0o700)):
            try:
                path.mkdir(parents=True, exist_ok=True, mode=mode)
                probe = path / f".pogly-write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise Fatal(EXIT_CONFIG, f"{var}={path} is not a writable directory ({exc.strerror}); "
                            "mount a writable volume there or point the variable elsewhere",
                            event="config.dir_unwritable") from exc

    async def _announce_ready(self) -> None:
        await self.spacetime.first_ready.wait()
        await self.caddy.first_ready.wait()
        await self._modules_ready.wait()
        await self._oidc_checked.wait()
        log.info("entrypoint.ready", oidc=self.status.oidc, url=f"http://127.0.0.1:{self.settings.http_port}/",
                 ready_ms=round((self.clock() - self._launched) * 1000, 1),
                 modules=list(self.settings.modules))

    async def _oidc(self) -> None:
        """Check the OIDC provider; fatal if its answer is wrong, "unverified" if it is unreachable.

        The check runs in a short-lived process of its own (``oidc-check``):
        authlib, joserfc and cryptography cost PID 1 about 10 MB of resident
        memory for its whole life if imported here, for a check that runs once.
        """
        if not self.settings.oidc_enabled:
            self.status.oidc = "disabled"
            self._oidc_checked.set()
            log.warning("oidc.disabled", message=OIDC_DISABLED_MESSAGE)
            return
        code, result = await self._oidc_check(self.settings.oidc_discovery_timeout)
        if code == 0:
            self.status.oidc = "verified"
            self._oidc_checked.set()
            return
        message = str(result.get("message") or f"oidc-check exited {code}")
        if code == EXIT_CONFIG:
            self.status.oidc = "failed"
            raise Fatal(EXIT_CONFIG, message, event="oidc.invalid", reason=result.get("reason"))
        if self.settings.strict_mode:
            self.status.oidc = "failed"
            raise Fatal(EXIT_UNAVAILABLE, f"{message} (STRICT_MODE=true: refusing to serve unverified)",
                        event="oidc.unavailable")
        self.status.oidc = "unverified"
        self._oidc_checked.set()
        log.error("oidc.unverified", issuer=self.settings.oidc_issuer, message=message,
                  action="serving anyway so overlays stay up; re-checking in the background")
        delay = 5.0
        while True:
            await asyncio.sleep(delay * (0.75 + random.random() / 2))
            code, result = await self._oidc_check(min(self.settings.oidc_discovery_timeout, 30.0))
            if code == 0:
                self.status.oidc = "verified"
                return
            if code == EXIT_CONFIG:
                log.error("oidc.invalid", message=result.get("message"), action="still serving; re-checking")
            delay = min(delay * 2, 60.0)

    async def _oidc_check(self, timeout: float) -> tuple[int, dict[str, Any]]:
        from entrypoint.supervision.process import run_capture

        argv = [sys.executable, "-m", "entrypoint", "oidc-check", "--timeout", f"{timeout:g}"]
        code, out, err = await run_capture(argv, dict(os.environ), timeout + 10.0, self.reaper)
        for line in err.decode("utf-8", "replace").splitlines():
            level, fields = logs.child_event("oidc", "stderr", line)
            logs.emit(level, fields)
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {"message": f"the OIDC check process failed ({code}): {err.decode(errors='replace')[-300:]}"}
            code = code if code in (EXIT_CONFIG, EXIT_UNAVAILABLE) else EXIT_UNAVAILABLE
        return code, result

    async def _lifecycle(self) -> None:
        """Publishing and everything that needs the database: runs once SpacetimeDB is first ready."""
        await self.spacetime.first_ready.wait()
        import httpx

        from entrypoint.spacetimedb.credentials import ensure_identity
        from entrypoint.spacetimedb.module_logs import follow_module_logs
        from entrypoint.spacetimedb.publish import publish_all
        from entrypoint.spacetimedb.server import tighten_key_modes

        base = self.settings.spacetime_addr.url
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30.0, connect=5.0)) as client:
            tighten_key_modes(self.settings.config_dir)
            publisher = await ensure_identity(self.settings, client)
            self.status.publisher_identity = publisher.identity
            await publish_all(self.settings, self.status, client, publisher)
            self._modules_ready.set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._republish_after_restarts(client, publisher), name="republish")
                for module in self.settings.modules:
                    tasks.create_task(follow_module_logs(self.settings, client, publisher, module),
                                      name=f"logs:{module}")
                self._start_ownership(tasks, client, publisher)

    async def _republish_after_restarts(self, client: Any, publisher: Any) -> None:
        """After SpacetimeDB restarts, make sure every module is still there.

        A crash within the server's 500 ms sync window can lose a database created
        just before it; ``publish_all`` skips what is present and unchanged, so
        this costs one identity lookup per module when nothing was lost.
        """
        from entrypoint.spacetimedb.publish import publish_all

        generation = self.spacetime.generation
        while True:
            generation = await self.spacetime.ready_after(generation)
            await publish_all(self.settings, self.status, client, publisher)

    def _start_ownership(self, tasks: asyncio.TaskGroup, client: Any, publisher: Any) -> None:
        """Seam for the first-user auto-claim (ownership.py)."""
        try:
            from entrypoint.spacetimedb import ownership
        except ImportError:
            return
        for module in self.settings.modules:
            tasks.create_task(ownership.watch(self.settings, self.status, client, publisher, module),
                              name=f"ownership:{module}")

    # -- shutdown --------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """Reverse order, each child within its grace, all within POGLY_STOP_TIMEOUT."""
        self.status.shutting_down = True  # /readyz answers 503 from here on
        deadline = self.clock() + self.settings.stop_timeout - STOP_MARGIN
        for service in self.stop_order:
            remaining = max(deadline - self.clock(), 0.0)
            await service.stop(min(service.grace(), remaining), self._force)

    def _kill_stragglers(self) -> None:
        """As PID 1, whatever still runs in the namespace dies with us; say so first."""
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                name = (entry / "comm").read_text().strip()
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except (OSError, IndexError):
                continue
            if zombie:
                continue
            log.warning("entrypoint.straggler_killed", pid=int(entry.name), comm=name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
        self.reaper.reap()
