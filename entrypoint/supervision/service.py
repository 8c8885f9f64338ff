"""One supervised child: one loop from launch to readiness to death to the next attempt.

``Service.supervise()`` is a child's whole life, one attempt per turn::

    prepare()                                     once: render, validate, check files
    loop:
      launch (or hand out the run adopted from before the event loop)
      race ready vs exit, within POGLY_START_TIMEOUT
          → an outcome: Ready | Died(code) | TimedOut | a subclass's own (SpacetimeDB: LockHeld)
      Ready → announce it, wait for the exit     → Died(code, was_ready=True)
      pause_after(outcome): the policy           → seconds to wait, or Fatal to give up
      sleep

A pause (``pause()``/``resume()``, asked for by the control channel for a
consistent backup) stops the ready run with the child's own stop signal and
grace, as a shutdown would; the loop sees that exit as "paused", not as a
death (no restart, no crash-loop count) and launches nothing until
``resume()``.  The next run is then an ordinary launch: readiness, a new
``generation`` (what follows a restart follows a resume too).

Stopping is not part of this loop.  A stop cancels the task that runs
``supervise`` (at whichever await it is: the race, the wait, the pause) and,
in the same step, calls ``begin_stop()`` for the child that exists; nothing
can restart afterwards because nothing runs the loop any more.

Subclasses in the domain packages (``spacetimedb.service``,
``web.caddy_service``) say what is particular to their child: ``spec``
(argv, environment), ``prepare``, ``on_line`` (readiness markers, lock
errors), ``wait_ready``, ``grace``, ``read_exit`` (what an exit before
readiness means) and ``pause_after`` (exceptions to the restart policy).
Every time comes from the injected ``clock``; children come from the injected
``launch`` (a fake in tests/supervision, ``Child`` otherwise).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from entrypoint import logs
from entrypoint.config import Settings
from entrypoint.errors import EXIT_UNAVAILABLE, Fatal
from entrypoint.supervision import status as state
from entrypoint.supervision.process import (
    Child,
    ChildHandle,
    ChildSpec,
    Launcher,
    LineSink,
    Reaper,
    describe_exit,
    exit_status,
)
from entrypoint.supervision.restart import RestartPolicy

Clock = Callable[[], float]
log = logs.get("supervisor")

#: The exit code a shell reports for "command not found / cannot execute": a failed spawn counts as one.
SPAWN_FAILED = 127


class Outcome:
    """How one attempt ended; ``pause_after`` turns it into a pause or a ``Fatal``."""


@dataclass(frozen=True)
class Ready(Outcome):
    """The child became ready before it exited and before the start timeout."""


@dataclass(frozen=True)
class Died(Outcome):
    """The child exited (``code``: ``-N`` for signal N) or could not be spawned (127)."""

    code: int
    was_ready: bool = False


@dataclass(frozen=True)
class TimedOut(Outcome):
    """Still running but not ready after ``POGLY_START_TIMEOUT``."""


class PauseRefused(Exception):
    """``pause()`` cannot pause now (not ready, already paused, stopping); the message says why."""


class Service:
    """One supervised child slot: start, readiness, restart with backoff, stop."""

    name = "child"
    stop_signal = signal.SIGTERM

    def __init__(self, settings: Settings, status: state.Status, reaper: Reaper, *,
                 clock: Clock = time.monotonic, launch: Launcher | None = None,
                 policy: RestartPolicy | None = None) -> None:
        self.settings = settings
        self.status = status
        self.reaper = reaper
        self.clock = clock
        self.launch: Launcher = launch or self._real_child
        self.policy = policy or RestartPolicy()
        self.child: ChildHandle | None = None
        self.launched_at = 0.0  # clock() when the current run was launched
        self.first_ready = asyncio.Event()
        # Set by a subclass when the current run says it serves nothing any more although its process is
        # still exiting (Caddy's "shutdown complete"): the supervisor may stop the next service from then.
        self.done_serving = asyncio.Event()
        self._when_done_serving: list[Callable[[], None]] = []
        self.generation = 0  # how many runs became ready; lets others react to a restart
        self._next_generation = asyncio.Event()  # set (and replaced) each time a run becomes ready
        self._adopted: ChildHandle | None = None
        self._ready = asyncio.Event()
        self._redactors: dict[str, logs.LineRedactor] = {}
        self._tail: list[str] = []  # last lines, quoted when the child fails
        self.paused: str | None = None  # why, while paused on purpose (pause()); no run is launched meanwhile
        self._resumed = asyncio.Event()  # replaced at each pause(), set by resume()
        self._paused_run: ChildHandle | None = None  # the run pause() stopped (its exit is no death)
        self.info = status.child(self.name)

    # -- what each child says about itself ---------------------------------------------
    async def prepare(self) -> None:
        """Work done once before the first start (render, validate, check files)."""

    def spec(self) -> ChildSpec:
        raise NotImplementedError

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        """Inspect a child's log line (readiness markers, lock errors)."""

    async def wait_ready(self, child: ChildHandle) -> None:
        """Return once ``child`` is ready; the caller races this with its exit."""
        await self._ready.wait()

    def grace(self) -> float:
        return 10.0

    def read_exit(self, code: int) -> Outcome:
        """What an exit before readiness means; a subclass may know better than "it died"."""
        return Died(code)

    async def pause_after(self, outcome: Outcome) -> float:
        """The restart policy: seconds until the next attempt, or ``Fatal`` to give up."""
        if isinstance(outcome, TimedOut):
            raise Fatal(
                EXIT_UNAVAILABLE,
                f"{self.name} did not become ready within {self.settings.start_timeout:g} s "
                f"(POGLY_START_TIMEOUT); its last lines: {self._tail[-5:]}",
                event="child.ready_timeout", child=self.name,
            )
        if not isinstance(outcome, Died):
            raise TypeError(f"{self.name}: no restart policy for {outcome!r}")
        self._record_exit(describe_exit(outcome.code), exit_status(outcome.code))
        verdict = self.policy.on_death(self.clock(), self.launched_at)
        if verdict.crash_loop:
            self.info.state = state.FAILED
            # A child that keeps exiting 0 must not end the container with 0 ("stopped on request"):
            # Docker's `restart: on-failure` and a Job's OnFailure would take a crash loop for success.
            raise Fatal(
                exit_status(outcome.code) or 1,
                f"{self.name} died {verdict.deaths_in_window} times within "
                f"{self.policy.loop_window:g} s ({describe_exit(outcome.code)}); giving up so the orchestrator's "
                f"restart policy takes over. Its last lines: {self._tail[-5:]}",
                event="child.crash_loop", child=self.name, code=outcome.code,
            )
        self.info.restarts += 1
        log.warning("child.exited", child=self.name, pid=self.child.pid if self.child else None,
                    exit=describe_exit(outcome.code), was_ready=outcome.was_ready,
                    restart_in_s=round(verdict.delay, 3), restarts=self.info.restarts)
        return verdict.delay

    # -- the loop ------------------------------------------------------------------------
    async def supervise(self) -> None:
        """Launch, race ready vs exit, let the policy decide, repeat; until cancelled or ``Fatal``."""
        await self.prepare()
        while True:
            while self.paused is not None:  # held by pause(): nothing is launched until resume()
                await self._resumed.wait()
            child = self._launch()
            outcome = await self._race_ready(child)
            if isinstance(outcome, Ready):
                assert child is not None
                self._became_ready(child)
                outcome = Died(await child.wait(), was_ready=True)
            if child is not None and child is self._paused_run:  # pause() stopped it: not a death, no restart
                self._paused_run = None
                continue
            pause = await self.pause_after(outcome)  # or Fatal: give up
            await asyncio.sleep(pause)

    async def pause(self, reason: str) -> str:
        """Stop the ready run on purpose and launch none until ``resume()``; how it ended ("exit code 0").

        The stop is the shutdown's: the child's stop signal and ``grace()``
        (SpacetimeDB: SIGINT, so it flushes), SIGKILL after it.  Only a ready
        run is paused: one that is starting, backing off or stopping would race
        the loop; ``PauseRefused`` says so and the caller may try again.
        """
        child = self.child
        if self.paused is not None:
            raise PauseRefused(f"{self.name} is already paused for {self.paused}")
        if self.info.state != state.READY or child is None or not child.running:
            raise PauseRefused(f"{self.name} is {self.info.state}, not ready; try again once it is")
        self.paused = reason
        self._paused_run = child
        self._resumed = asyncio.Event()
        self.info.state = state.STOPPING
        started = self.clock()
        grace = self.grace()
        log.info("child.pausing", child=self.name, pid=child.pid, reason=reason,
                 signal=signal.Signals(self.stop_signal).name, grace_s=round(grace, 2))
        code, killed = await child.stop(grace, asyncio.Event())
        self.info.pid = None
        self.info.last_exit = describe_exit(code)
        self.info.paused_for = reason
        if self.paused is not None and self.info.state == state.STOPPING:  # not resumed or shut down meanwhile
            self.info.state = state.PAUSED
        (log.warning if killed else log.info)(
            "child.paused", child=self.name, reason=reason, exit=describe_exit(code), killed=killed,
            stop_ms=round((self.clock() - started) * 1000, 1))
        return describe_exit(code)

    def resume(self, why: str = "resumed") -> bool:
        """End a pause: the loop launches the next run at once.  False when there was no pause."""
        if self.paused is None:
            return False
        reason, self.paused = self.paused, None
        self.info.paused_for = None
        log.info("child.resuming", child=self.name, reason=reason, why=why)
        self._resumed.set()
        return True

    async def ready_after(self, generation: int) -> int:
        """Wait until a run later than ``generation`` is ready; return its generation."""
        while self.generation <= generation:
            await self._next_generation.wait()
        return self.generation

    def adopt(self, early: tuple[int, int, int, float]) -> None:
        """Take over a child spawned before the event loop existed (``spacetimedb.server.prespawn``).

        It becomes ``self.child`` at once, so a stop requested before the first
        ``supervise`` step still stops it; the first launch hands it out
        instead of spawning.
        """
        spec = self.spec()
        self._adopted = self._begin(Child(spec, self.reaper, self._sink, lambda *_: early[:3]), spec,
                                    spawned_at=early[3])

    def _launch(self) -> ChildHandle | None:
        """One run of the child: the adopted one, else a new one; None when it cannot be executed."""
        adopted, self._adopted = self._adopted, None
        if adopted is not None:
            return adopted
        spec = self.spec()
        return self._begin(self.launch(spec, self._sink), spec)

    def _real_child(self, spec: ChildSpec, sink: LineSink) -> ChildHandle:
        return Child(spec, self.reaper, sink)

    def _begin(self, child: ChildHandle, spec: ChildSpec, spawned_at: float | None = None) -> ChildHandle | None:
        self._ready.clear()
        self.done_serving.clear()
        self._redactors = {stream: logs.LineRedactor(self.name, stream) for stream in ("stdout", "stderr")}
        self.child = child
        self.launched_at = self.clock()
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
        self.info.started_at = spawned_at or time.time()  # wall clock, for people reading /status
        self.info.started_boottime = state.process_start(child.pid) if child.pid is not None else None
        extra = {"prespawned_at": spawned_at} if spawned_at else {}
        log.info("child.started", child=self.name, pid=child.pid, argv=spec.argv, **extra)
        return child

    async def _race_ready(self, child: ChildHandle | None) -> Outcome:
        """Ready, or why not: its exit (as ``read_exit`` reads it) or no readiness in time."""
        if child is None:
            return Died(SPAWN_FAILED)
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
            return Ready()
        if exited in done or not child.running:
            return self.read_exit(await child.wait())
        if ready in done:
            raise ready.exception()  # type: ignore[misc]  # a bug in wait_ready: let it surface
        return TimedOut()

    def _became_ready(self, child: ChildHandle) -> None:
        self.info.state = state.READY
        self.info.ready_seconds = round(self.clock() - self.launched_at, 3)
        self.status.unanswered.pop(self.name, None)  # a new run answered its readiness check: no stale "not answering"
        if not self.first_ready.is_set():
            log.info("child.ready", child=self.name, pid=child.pid,
                     startup_ms=round((self.clock() - self.launched_at) * 1000, 1))
        else:
            log.info("child.ready", child=self.name, pid=child.pid)
        self.first_ready.set()
        self.generation += 1
        waking, self._next_generation = self._next_generation, asyncio.Event()
        waking.set()

    def _record_exit(self, last_exit: str, code: int | None = None) -> None:
        """The status between two runs: no PID, why the last one ended (``code``: its exit status, if any)."""
        self.info.state = state.BACKOFF
        self.info.pid = None
        self.info.last_exit = last_exit
        self.info.last_exit_code = code

    def _sink(self, stream: str, raw: bytes, truncated: bool) -> None:
        text = self._redactors[stream](logs.decode_line(raw, truncated))
        if text is None:
            return
        level, fields = logs.child_event(self.name, stream, text)
        self._tail = [*self._tail[-9:], str(fields.get("message", ""))[:300]]
        if self.child is not None and self.child.pid is not None:
            fields["pid"] = self.child.pid
        logs.emit(level, fields)
        # After the line is logged: what it triggers (ready, the next child's stop) reads after it.
        self.on_line(stream, fields)

    # -- stop (called by the supervisor, as the loop above is cancelled) ---------------------
    def begin_stop(self, grace: float, force: asyncio.Event) -> asyncio.Future[None]:
        """Stop the run that exists, if any: its stop signal now, in the caller's step; the returned future is
        the rest of the stop (``grace`` seconds, or until ``force``, then SIGKILL).

        Synchronous on purpose: the supervisor calls it from the step that
        handles the signal, and from the line that says the previous child is
        done serving, so no scheduler wake-up sits between the two.
        """
        child = self.child
        if child is None or not child.running:
            self.info.state = state.STOPPED
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self.info.state = state.STOPPING
        started = self.clock()
        child.send_stop_signal()  # the signal first: a stop must never wait on a log write
        log.info("child.stopping", child=self.name, pid=child.pid,
                 signal=signal.Signals(self.stop_signal).name, grace_s=round(grace, 2))
        return asyncio.ensure_future(self._finish_stop(child, grace, force, started))

    def mark_done_serving(self) -> None:
        """The current run serves nothing any more although its process is still exiting.

        Whoever waits for that (``call_when_done_serving``) is called right
        here, in this step: the next child's stop signal leaves without a hop.
        """
        if self.done_serving.is_set():
            return
        self.done_serving.set()
        callbacks, self._when_done_serving = self._when_done_serving, []
        for callback in callbacks:
            callback()

    def call_when_done_serving(self, callback: Callable[[], None]) -> None:
        """``callback()`` once the current run is done serving (at once if it already is)."""
        if self.done_serving.is_set():
            callback()
        else:
            self._when_done_serving.append(callback)

    async def _finish_stop(self, child: ChildHandle, grace: float, force: asyncio.Event, started: float) -> None:
        code, killed = await child.stop(grace, force)
        self.info.state = state.STOPPED
        self.info.pid = None
        self.info.last_exit = describe_exit(code)
        self.info.last_exit_code = exit_status(code)
        self.info.stop_seconds = round(self.clock() - started, 3)
        (log.warning if killed else log.info)(
            "child.stopped", child=self.name, exit=describe_exit(code), killed=killed,
            stop_ms=round((self.clock() - started) * 1000, 1),
        )
