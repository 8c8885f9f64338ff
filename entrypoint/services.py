"""The two supervised children: how each starts, becomes ready, dies and stops.

A ``Service`` owns one child slot and its restart policy; the subclasses add
what is particular to SpacetimeDB (readiness by ``/v1/ping``, the lock-held
retry, SIGINT as stop signal) and Caddy (validate before run, readiness from
its log, exit 1 = do not restart).  Ordering between services is not decided
here but in ``supervisor.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from entrypoint import logs, state
from entrypoint.config import Settings
from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, Fatal
from entrypoint.fsutil import atomic_write
from entrypoint.process import Child, ChildSpec, Reaper, Spawner, describe_exit, exit_status, spawn
from entrypoint.restart import RestartPolicy

Clock = Callable[[], float]
log = logs.get("supervisor")


class ExitedBeforeReady(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(describe_exit(code))
        self.code = code


class LockHeld(Exception):
    """SpacetimeDB refused to start: another live process holds ``spacetime.pid`` (an flock)."""

    def __init__(self, holder: int) -> None:
        super().__init__(f"lock held by pid {holder}")
        self.holder = holder


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


class SpacetimeService(Service):
    """SpacetimeDB: SIGINT to stop (no SIGTERM handler upstream), ping for readiness."""

    name = "spacetimedb"
    stop_signal = signal.SIGINT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listening = asyncio.Event()
        self.lock_holder: int | None = None

    async def prepare(self) -> None:
        from entrypoint import spacetime

        spacetime.check_keys(self.settings.config_dir)

    def spec(self) -> ChildSpec:
        from entrypoint import spacetime

        self._listening.clear()
        self.lock_holder = None
        return ChildSpec(self.name, spacetime.command(self.settings), dict(os.environ),
                         signal.SIGINT, self.grace())

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        from entrypoint import spacetime

        text = str(fields["event"])
        if spacetime.is_listening_line(text):
            self._listening.set()
            return
        holder = spacetime.parse_lock_error(text)
        if holder is not None:
            self.lock_holder = holder

    async def wait_ready(self, child: Child) -> None:
        from entrypoint import spacetime

        delay = 0.005
        while True:
            if await spacetime.ping(self.settings.spacetime_addr, timeout=1.0):
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._listening.wait()
            delay = min(delay * 2, 0.2)

    def grace(self) -> float:
        return max(self.settings.stop_timeout - 1.0, 1.0)

    async def start_ready(self) -> Child:
        """Like ``Service.start_ready``, but a held lock is waited out, not counted as a death."""
        import tenacity

        deadline = self.clock() + self.settings.lock_wait

        async def attempt() -> Child:
            child = self._start()
            if child is None:
                await self._after_death(None, 127, was_ready=False)
                raise ExitedBeforeReady(127)
            try:
                await self._race_ready(child)
                return child
            except ExitedBeforeReady as died:
                if self.lock_holder is None:
                    await self._after_death(child, died.code, was_ready=False)
                    raise
                holder = self.lock_holder
                if await self._stop_leftover(holder):
                    raise LockHeld(holder) from None
                self.info.state = state.BACKOFF
                self.info.pid = None
                self.info.last_exit = f"lock held by pid {holder}"
                log.warning("spacetime.lock_held", holder_pid=holder,
                            waited_s=round(self.settings.lock_wait - (deadline - self.clock()), 1),
                            wait_limit_s=self.settings.lock_wait,
                            hint="another SpacetimeDB holds the data directory; waiting for it to exit")
                raise LockHeld(holder) from None

        while True:
            try:
                async for try_ in tenacity.AsyncRetrying(
                    retry=tenacity.retry_if_exception_type(LockHeld),
                    wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0, jitter=0.2),
                    stop=tenacity.stop_before_delay(max(deadline - self.clock(), 0.0)),
                    reraise=True,
                ):
                    with try_:
                        return await attempt()
            except LockHeld as held:
                holder = held.holder
                raise Fatal(
                    EXIT_UNAVAILABLE,
                    f"SpacetimeDB could not lock {self.settings.data_dir}: spacetime.pid is held by live "
                    f"process {holder or 'unknown'} for over {self.settings.lock_wait:g} s (POGLY_LOCK_WAIT). "
                    "This usually means an old pod or container is still running with the same volume: "
                    "stop it, and use `strategy: Recreate` for the Deployment. Do NOT delete spacetime.pid: "
                    "it is an flock, and deleting it lets two servers write one data directory.",
                    event="spacetime.lock_timeout", holder_pid=holder,
                ) from None
            except ExitedBeforeReady:
                continue  # an ordinary death: policy already applied its backoff

    async def _stop_leftover(self, pid: int) -> bool:
        """Stop a SpacetimeDB left on *our* data dir by an earlier run of ours in this namespace."""
        if pid <= 1 or pid == os.getpid():
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        # Ours means: re-parented to us (we are PID 1 or its subreaper) after the
        # run that started it died.  Anything else belongs to someone else: wait.
        if int(stat[stat.rindex(")") + 2 :].split()[1]) != os.getpid():
            return False
        data_dir = str(self.settings.data_dir).encode()
        if b"start" not in cmdline or not any(
            arg == data_dir or arg.endswith(b"=" + data_dir) for arg in cmdline
        ):
            return False
        log.warning("spacetime.leftover_stopping", holder_pid=pid,
                    reason="a SpacetimeDB from an earlier run holds our data dir; stopping it with SIGINT")
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        loop.add_reader(pidfd, gone.set)
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.grace()):
                    await gone.wait()
            if not gone.is_set():
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await gone.wait()
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return True


class CaddyService(Service):
    """Caddy: validated before it runs, ready when it logs so, exit 1 is final."""

    name = "caddy"
    stop_signal = signal.SIGTERM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.caddyfile: Path | None = None
        self._ready_msg: str | None = None  # caddy.READY_MSG, set in prepare (caddy.py imports jinja2)

    async def prepare(self) -> None:
        from entrypoint import caddy, webapp, webconfig
        from entrypoint.process import run_capture

        self._ready_msg = caddy.READY_MSG
        webconfig.write_config_js(self.settings)
        # Which web build this is, from the files as the build made them (before the patch below);
        # a bounded read in a thread so SpacetimeDB's readiness is not held up meanwhile.
        build = await asyncio.to_thread(webapp.detect, self.settings.web_root)
        loads = webconfig.ensure_index_loads_config(self.settings.web_root)  # logs what it did
        self.status.webapp = webapp.report(self.settings, build, served_loads_config=loads)  # Fatal 78 if strict
        try:
            text = caddy.render(self.settings)
        except Exception as exc:  # template errors are configuration errors
            raise Fatal(EXIT_CONFIG, f"could not render Caddyfile.j2: {exc}", event="caddy.render_failed") from exc
        path = caddy.write(self.settings, text)

        self.caddyfile = path
        stamp = path.with_name(path.name + ".validated")
        key = caddy.validation_key(self.settings, text)
        with contextlib.suppress(OSError):
            if stamp.read_text() == key:
                log.info("caddy.validate_skipped", reason="this Caddyfile was validated by this caddy binary")
                return

        async def runner(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
            return await run_capture(argv, env, timeout, self.reaper)

        try:
            await caddy.validate(self.settings, path, runner)
        except caddy.CaddyConfigError as exc:
            raise Fatal(EXIT_CONFIG, str(exc), event="caddy.invalid_config") from exc
        except OSError as exc:
            raise Fatal(EXIT_CONFIG, f"cannot run CADDY_BIN={self.settings.caddy_bin}: {exc}",
                        event="caddy.not_executable") from exc
        except TimeoutError as exc:
            raise Fatal(EXIT_UNAVAILABLE, "`caddy validate` did not finish in time",
                        event="caddy.validate_timeout") from exc
        atomic_write(stamp, key)

    def spec(self) -> ChildSpec:
        from entrypoint import caddy

        assert self.caddyfile is not None
        return ChildSpec(self.name, caddy.run_command(self.settings, self.caddyfile),
                         caddy.environment(self.settings, dict(os.environ)), signal.SIGTERM, self.grace())

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        if fields.get("event") == self._ready_msg:
            self._ready.set()

    def grace(self) -> float:
        from entrypoint import caddy

        return caddy.stop_grace(self.settings)

    def fatal_exit(self, code: int, was_ready: bool) -> Fatal | None:
        if code == 1 and not was_ready:
            return Fatal(1, "Caddy failed to start (exit 1 = failed startup; Caddy's docs say not to restart "
                         f"it). Its last lines: {self._tail[-5:]}", event="caddy.startup_failed")
        return None
