"""One supervised child slot: start, readiness, restart with backoff, stop.

A ``Service`` owns one child and its restart policy; subclasses in the domain
packages add what is particular to each child (``spacetimedb.service``,
``web.caddy_service``).  Ordering between services is decided by the startup story.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

from entrypoint import logs
from entrypoint.config import Settings
from entrypoint.errors import EXIT_UNAVAILABLE, Fatal
from entrypoint.supervision import status as state
from entrypoint.supervision.process import Child, ChildSpec, Reaper, Spawner, describe_exit, exit_status, spawn
from entrypoint.supervision.restart import RestartPolicy

Clock = Callable[[], float]
log = logs.get("supervisor")


class ExitedBeforeReady(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(describe_exit(code))
        self.code = code



class Service:
    """One supervised child slot: start, readiness, restart with backoff, stop."""

    name = "child"
    stop_signal = signal.SIGTERM

    def __init__(self, settings: Settings, status: state.Status, reaper: Reaper, *,
                 clock: Clock = time.monotonic, spawner: Spawner = spawn,
                 policy: RestartPolicy | None = None) -> None:
        self.settings = settings
        self.status = status
        self.reaper = reaper
        self.clock = clock
        self.spawner = spawner
        self.policy = policy or RestartPolicy()
        self.child: Child | None = None
        self._adopted: Child | None = None
        self.first_ready = asyncio.Event()
        self.stopping = False  # set by the supervisor at shutdown: never start or restart again
        self.generation = 0  # how many runs became ready; lets others react to a restart
        self._ready_changed = asyncio.Condition()
        self._ready = asyncio.Event()
        self._redactors: dict[str, logs.LineRedactor] = {}
        self._tail: list[str] = []  # last lines, quoted when the child fails
        self.info = status.child(self.name)

    # -- hooks for subclasses -------------------------------------------------
    async def prepare(self) -> None:
        """Work done once before the first start (render, validate, check files)."""

    def spec(self) -> ChildSpec:
        raise NotImplementedError

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        """Inspect a child's log line (readiness markers, lock errors)."""

    async def wait_ready(self, child: Child) -> None:
        """Return once ``child`` is ready; the caller races this with its exit."""
        await self._ready.wait()

    def grace(self) -> float:
        return 10.0

    def fatal_exit(self, code: int, was_ready: bool) -> Fatal | None:
        """A death that must not be retried (e.g. Caddy's exit 1 at startup)."""
        return None

    # -- the loop ----------------------------------------------------------------
    async def supervise(self) -> None:
        """Start, wait ready, wait for death, restart per policy; forever (until cancelled)."""
        await self.prepare()
        while True:
            child = await self.start_ready()
            self.info.state = state.READY
            if not self.first_ready.is_set():
                log.info("child.ready", child=self.name, pid=child.pid,
                         startup_ms=round((self.clock() - child.started_at) * 1000, 1))
            else:
                log.info("child.ready", child=self.name, pid=child.pid)
            self.first_ready.set()
            self.generation += 1
            async with self._ready_changed:
                self._ready_changed.notify_all()
            code = await child.wait()
            await self._after_death(child, code, was_ready=True)

    async def ready_after(self, generation: int) -> int:
        """Wait until a run later than ``generation`` is ready; return its generation."""
        async with self._ready_changed:
            await self._ready_changed.wait_for(lambda: self.generation > generation)
            return self.generation

    async def start_ready(self) -> Child:
        """Start the child until one run becomes ready (deaths before ready are retried)."""
        while True:
            child = self._start()
            if child is None:
                await self._after_death(None, 127, was_ready=False)
                continue
            try:
                await self._race_ready(child)
                return child
            except ExitedBeforeReady as died:
                await self._after_death(child, died.code, was_ready=False)

    def adopt(self, early: tuple[int, int, int, float]) -> None:
        """Take over a child spawned before the event loop existed (``spacetime.prespawn``).

        It becomes ``self.child`` at once, so a stop requested before the first
        ``supervise`` step still stops it; ``_start`` then hands it out instead
        of spawning.
        """
        spec = self.spec()
        child = Child(spec, self.reaper, self._sink, lambda *_: early[:3])
        self._start_child(child, spec, spawned_at=early[3])
        self._adopted = child

    def _start(self) -> Child | None:
        adopted, self._adopted = self._adopted, None
        if adopted is not None:
            return adopted
        if self.stopping:
            raise asyncio.CancelledError
        spec = self.spec()
        return self._start_child(Child(spec, self.reaper, self._sink, self.spawner), spec)

    def _start_child(self, child: Child, spec: ChildSpec, spawned_at: float | None = None) -> Child | None:
        self._ready.clear()
        self._redactors = {"stdout": logs.LineRedactor(), "stderr": logs.LineRedactor()}
        self.child = child
        self.info.state = state.STARTING
        try:
            child.start()
        except OSError as exc:
            log.error("child.spawn_failed", child=self.name, argv0=spec.argv[0], error=str(exc),
                      fix=f"check that {spec.argv[0]} exists and is executable")
            self.info.pid = None
            self.info.last_exit = f"spawn failed: {exc}"
            return None
        self.info.pid = child.pid
        self.info.started_at = spawned_at or time.time()
        extra = {"prespawned_at": spawned_at} if spawned_at else {}
        log.info("child.started", child=self.name, pid=child.pid, argv=spec.argv, **extra)
        return child

    async def _race_ready(self, child: Child) -> None:
        ready = asyncio.ensure_future(self.wait_ready(child))
        exited = asyncio.ensure_future(child.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, exited}, timeout=self.settings.start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            exited.cancel()
        if ready in done and ready.exception() is None:
            return
        if exited in done or not child.running:
            raise ExitedBeforeReady(await child.wait())
        if ready in done:
            raise ready.exception()  # type: ignore[misc]
        raise Fatal(
            EXIT_UNAVAILABLE,
            f"{self.name} did not become ready within {self.settings.start_timeout:g} s "
            f"(POGLY_START_TIMEOUT); its last lines: {self._tail[-5:]}",
            event="child.ready_timeout", child=self.name,
        )

    async def _after_death(self, child: Child | None, code: int, *, was_ready: bool) -> None:
        self.info.state = state.BACKOFF
        self.info.pid = None
        self.info.last_exit = describe_exit(code)
        fatal = self.fatal_exit(code, was_ready)
        if fatal is not None:
            raise fatal
        started = child.started_at if child is not None else self.clock()
        verdict = self.policy.on_death(self.clock(), started)
        if verdict.crash_loop:
            self.info.state = state.FAILED
            raise Fatal(
                exit_status(code),
                f"{self.name} died {verdict.deaths_in_window} times within "
                f"{self.policy.loop_window:g} s ({describe_exit(code)}); giving up so the orchestrator's "
                f"restart policy takes over. Its last lines: {self._tail[-5:]}",
                event="child.crash_loop", child=self.name, code=code,
            )
        self.info.restarts += 1
        log.warning("child.exited", child=self.name, pid=child.pid if child else None,
                    exit=describe_exit(code), was_ready=was_ready,
                    restart_in_s=round(verdict.delay, 3), restarts=self.info.restarts)
        await asyncio.sleep(verdict.delay)

    def _sink(self, stream: str, raw: bytes, truncated: bool) -> None:
        text = self._redactors[stream](logs.decode_line(raw, truncated))
        if text is None:
            return
        level, fields = logs.child_event(self.name, stream, text)
        self._tail = [*self._tail[-9:], str(fields["event"])[:300]]
        self.on_line(stream, fields)
        if self.child is not None and self.child.pid is not None:
            fields["pid"] = self.child.pid
        logs.emit(level, fields)

    async def stop(self, grace: float, force: asyncio.Event) -> None:
        child = self.child
        if child is None or not child.running:
            self.info.state = state.STOPPED
            return
        self.info.state = state.STOPPING
        started = self.clock()
        log.info("child.stopping", child=self.name, pid=child.pid,
                 signal=signal.Signals(self.stop_signal).name, grace_s=round(grace, 2))
        code, killed = await child.stop(grace, force)
        self.info.state = state.STOPPED
        self.info.pid = None
        self.info.last_exit = describe_exit(code)
        (log.warning if killed else log.info)(
            "child.stopped", child=self.name, exit=describe_exit(code), killed=killed,
            stop_ms=round((self.clock() - started) * 1000, 1),
        )


