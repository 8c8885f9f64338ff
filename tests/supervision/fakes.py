"""Scripted children and virtual time for in-process tests of supervision (honcho's FakeProcess idea).

* ``VirtualTimeLoop``: an asyncio loop whose clock jumps to the next timer
  whenever nothing is ready to run, so backoff pauses, start timeouts and stop
  graces cost no real time, and every time the code reads (``loop.time`` is
  the injected clock) is exact.
* ``Run``: what one launch of a child does, on that clock: the lines it
  prints and when, whether it exits by itself, how it answers its stop signal.
* ``Scripted``: the injected ``Launcher``; each launch of a service takes the
  next ``Run`` of its script and writes what happens into one ``journal`` the
  test reads as a history: ``(time, child, what, detail)``.

No process is started and no signal is sent: a ``FakeChild`` only pretends.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import selectors
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from entrypoint.config import Settings
from entrypoint.spacetimedb.service import SpacetimeService
from entrypoint.supervision.process import ChildSpec, LineSink, Reaper
from entrypoint.supervision.restart import RestartPolicy
from entrypoint.supervision.service import Service
from entrypoint.supervision.status import Status
from entrypoint.supervision.supervisor import Supervisor
from entrypoint.web import caddy
from entrypoint.web.caddy_service import CaddyService

T = TypeVar("T")


class _IdleSelector:
    """Polls the real selector without blocking; when the loop would block, moves virtual time instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("deadlock: nothing is ready and no timer is scheduled (the test would hang)")
        self._loop.now += timeout
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: ``time()`` starts at 0 and only moves when the loop is idle."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_IdleSelector(self))  # type: ignore[arg-type]

    def time(self) -> float:
        return self.now


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` to completion on a fresh ``VirtualTimeLoop``."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@dataclass
class Run:
    """One launch of a fake child; times are seconds after its launch."""

    lines: list[tuple[float, str]] = field(default_factory=list)  # printed on stderr
    exit_at: float | None = None  # exits by itself then, with ``code``; None: runs until stopped
    code: int = 0
    serving_at: float | None = None  # a fake ping answers 200 from then on (SpacetimeDB's /v1/ping)
    stop_takes: float | None = 0.0  # after its stop signal, exits 0 this much later; None: ignores it
    stop_lines: list[tuple[float, str]] = field(default_factory=list)  # printed on stderr, times after the signal
    spawn_error: bool = False  # the program cannot be executed (posix_spawn's OSError)


Journal = list[tuple[float, str, str, Any]]
_pids = itertools.count(424_242)


class FakeChild:
    """A ``ChildHandle`` that follows its ``Run`` on the loop's clock and writes a journal."""

    def __init__(self, spec: ChildSpec, sink: LineSink, run: Run, journal: Journal,
                 observe: Callable[[], Any] = lambda: None) -> None:
        self.spec = spec
        self.sink = sink
        self.run = run
        self.journal = journal
        self.observe = observe  # what the journal records beside a stop (e.g. /readyz's state)
        self.pid: int | None = None
        self.code: int | None = None
        self.launched_at = 0.0
        self._done = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self._stop_sent = False
        self._stop_note: dict[str, Any] = {}

    def _note(self, what: str, detail: Any = None) -> None:
        self.journal.append((asyncio.get_running_loop().time(), self.spec.name, what, detail))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.run.spawn_error:
            self._note("spawn_failed")
            raise OSError(errno.ENOENT, "No such file or directory", self.spec.argv[0])
        self.pid = next(_pids)
        self.launched_at = loop.time()
        self._note("launched", self.pid)
        for at, line in self.run.lines:
            self._timers.append(loop.call_later(at, self.sink, "stderr", line.encode(), False))
        if self.run.exit_at is not None:
            self._timers.append(loop.call_later(self.run.exit_at, self._exit, self.run.code))

    @property
    def serving(self) -> bool:
        return (self.running and self.run.serving_at is not None
                and asyncio.get_running_loop().time() >= self.launched_at + self.run.serving_at)

    @property
    def running(self) -> bool:
        return self.pid is not None and not self._done.is_set()

    def _exit(self, code: int) -> None:
        if self._done.is_set():
            return
        for timer in self._timers:
            timer.cancel()
        self.code = code
        self._note("exited", code)
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.code is not None
        return self.code

    def send_stop_signal(self) -> None:
        """Like ``Child.send_stop_signal``: once per run, in the caller's step."""
        if self._stop_sent or not self.running:
            return
        self._stop_sent = True
        # The grace is only known to stop(), which follows in the next step; it fills it in here.
        self._stop_note = {"signal": self.spec.stop_signal, "grace": None, "observed": self.observe()}
        self._note("stop_signal", self._stop_note)
        loop = asyncio.get_running_loop()
        for at, line in self.run.stop_lines:
            self._timers.append(loop.call_later(at, self.sink, "stderr", line.encode(), False))
        if self.run.stop_takes is not None:
            self._timers.append(loop.call_later(self.run.stop_takes, self._exit, 0))

    async def stop(self, grace: float | None = None, force: asyncio.Event | None = None) -> tuple[int, bool]:
        """Like ``Child.stop``: the stop signal (unless sent), up to ``grace`` (or until ``force``), SIGKILL."""
        if not self.running:
            return (self.code if self.code is not None else 0), False
        self.send_stop_signal()
        self._stop_note["grace"] = grace
        waiters = {asyncio.ensure_future(self._done.wait())}
        if force is not None:
            waiters.add(asyncio.ensure_future(force.wait()))
        try:
            await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._done.is_set():
            return await self.wait(), False
        self._note("sigkill")
        self._exit(-9)
        return -9, True


class Scripted:
    """The injected launcher: launch *n* of a service plays ``runs[n]`` (the last one again past the end)."""

    def __init__(self, runs: list[Run], journal: Journal, observe: Callable[[], Any] = lambda: None) -> None:
        self.runs = runs
        self.journal = journal
        self.observe = observe
        self.children: list[FakeChild] = []

    def __call__(self, spec: ChildSpec, sink: LineSink) -> FakeChild:
        run = self.runs[min(len(self.children), len(self.runs) - 1)]
        child = FakeChild(spec, sink, run, self.journal, self.observe)
        self.children.append(child)
        return child

    @property
    def current(self) -> FakeChild | None:
        return self.children[-1] if self.children else None

    async def ping(self, addr: object, timeout: float) -> bool:
        """A fake ``spacetimedb.server.ping``: 200 while the current run is serving."""
        del addr, timeout
        return self.current is not None and self.current.serving


def history(journal: Journal, what: str, child: str | None = None) -> list[tuple[float, Any]]:
    """``(time, detail)`` of every ``what`` in the journal, for one child or all."""
    return [(t, detail) for t, name, kind, detail in journal if kind == what and (child is None or name == child)]


# --------------------------------------------------------------------------- services on the fakes

CADDY_READY = '{"level":"info","msg":"serving initial configuration"}'
# Logged by Caddy once every app (every HTTP server) has stopped, just before os.Exit (caddy.go, exitProcess).
CADDY_DONE = '{"level":"info","msg":"shutdown complete","signal":"SIGTERM","exit_code":0}'
LISTENING = "Starting SpacetimeDB listening on 127.0.0.1:3000"


def settings_for(tmp: Path, **overrides: Any) -> Settings:
    """Settings whose directories are under ``tmp`` (nothing is written there by these tests)."""
    return Settings(oidc_issuer="", oidc_client_id="", data_dir=tmp / "data", config_dir=tmp / "config",
                    run_dir=tmp / "run", web_root=tmp / "web", **overrides)


def exact_policy() -> RestartPolicy:
    """The production policy without jitter, so every pause is exact: 0.1, 0.2, 0.4 … s."""
    return RestartPolicy(rng=lambda: 0.0)


class Toy(Service):
    """The smallest child: ready when it prints ``toy is ready``."""

    name = "toy"

    def spec(self) -> ChildSpec:
        return ChildSpec(self.name, ["/usr/bin/toy"], {})

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        if fields.get("message") == "toy is ready":
            self._ready.set()


class FilelessCaddy(CaddyService):
    """``CaddyService`` without ``prepare``'s files and ``caddy validate``: its loop and policy are under test."""

    async def prepare(self) -> None:
        self.caddyfile = self.settings.run_dir / "Caddyfile"
        self._ready_msg = caddy.READY_MSG


@dataclass
class World:
    """The two real services on scripted children, one journal, one status, the virtual clock."""

    settings: Settings
    status: Status
    journal: Journal
    spacetime: SpacetimeService
    caddy: FilelessCaddy
    spacetime_runs: Scripted
    caddy_runs: Scripted

    @classmethod
    def build(cls, settings: Settings, spacetime: list[Run], caddy_runs: list[Run]) -> World:
        loop = asyncio.get_running_loop()
        status = Status(oidc="disabled")  # no OIDC job runs here: as with OIDC off, nothing to wait for
        journal: Journal = []

        def observe() -> dict[str, bool]:  # recorded with each stop signal: does /readyz already say 503?
            return {"shutting_down": status.shutting_down}

        st_runs, caddy_scripted = Scripted(spacetime, journal, observe), Scripted(caddy_runs, journal, observe)
        st = SpacetimeService(settings, status, Reaper(), clock=loop.time, launch=st_runs, ping=st_runs.ping,
                              policy=exact_policy())
        cd = FilelessCaddy(settings, status, Reaper(), clock=loop.time, launch=caddy_scripted, policy=exact_policy())
        return cls(settings, status, journal, st, cd, st_runs, caddy_scripted)

    def supervisor(self) -> Supervisor:
        return Supervisor(self.status, [self.spacetime, self.caddy], Reaper(), stop_timeout=self.settings.stop_timeout,
                          clock=asyncio.get_running_loop().time)


def serving_spacetime(**kw: Any) -> Run:
    return Run(lines=[(0.0, LISTENING)], serving_at=0.0, **kw)


def ready_caddy(**kw: Any) -> Run:
    return Run(lines=[(0.01, CADDY_READY)], **kw)


def stop_at(when: float, supervisor: Supervisor, signum: int = signal.SIGTERM) -> None:
    """Deliver a stop request at virtual time ``when``, as the loop's signal handler would."""
    asyncio.get_running_loop().call_at(when, supervisor.request_stop, signum)


def play(tmp: Path, spacetime: list[Run], caddy_runs: list[Run], *, stops: tuple[tuple[float, int], ...] = (),
         jobs: dict[str, Any] | None = None, **settings: Any) -> tuple[int, World, list[dict[str, Any]]]:
    """Run the supervisor over the scripted children, with stop requests at the given virtual times."""
    from structlog.testing import capture_logs

    async def main() -> tuple[int, World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp, **settings), spacetime, caddy_runs)
        supervisor = world.supervisor()
        for when, signum in stops:
            stop_at(when, supervisor, signum)
        with capture_logs() as logs:
            code = await supervisor.run(jobs=jobs)
        return code, world, logs

    return run_virtual(main)


def stop_signals(world: World) -> list[tuple[str, float]]:
    """``(child, time)`` of every stop signal sent, in order."""
    return [(name, t) for t, name, what, _ in world.journal if what == "stop_signal"]
