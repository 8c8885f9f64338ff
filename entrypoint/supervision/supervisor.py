"""Services and jobs in one task group: started together, announced ready, stopped in reverse order.

Generic on purpose: it knows ``Service`` objects and awaitable jobs, never
which children or which work they are (that is ``entrypoint/startup.py``)::

    run(first, jobs)
      main task: first() → TaskGroup { each service's supervise(), each job, the readiness announcement }
      until a stop request (signal) or the first Fatal / internal error:
      stop = cancel main (every service loop and job ends at its next await: nothing restarts)
           ∥ in the signal's own step: /readyz 503 → each service's child stopped, in reverse start order,
                        each within its grace, all within POGLY_STOP_TIMEOUT; the next one's stop
                        begins when the previous child has exited or said it serves nothing any more
      → main's helpers gone (cancelled short commands are killed and reaped) → as PID 1 or subreaper, sweep stragglers
      → exit code: 0 on request, else the first Fatal's code, 70 for a bug

A second stop request skips the remaining graces: SIGKILL at once.  Signal
handlers only call ``request_stop``; what was in flight is cancelled at its
next await, and the shutdown stops exactly the children that exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from entrypoint import logs
from entrypoint.errors import EXIT_SOFTWARE, Fatal
from entrypoint.supervision.process import Reaper
from entrypoint.supervision.service import Service
from entrypoint.supervision.spawn import is_subreaper
from entrypoint.supervision.status import Status

log = logs.get("supervisor")
STOP_MARGIN = 0.5  # seconds kept back from POGLY_STOP_TIMEOUT for our own exit

Job = Callable[[], Awaitable[None]]


class Supervisor:
    """Runs services and jobs until stopped or failed; stops the children within the budget."""

    def __init__(self, status: Status, services: Sequence[Service], reaper: Reaper, *, stop_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.status = status
        self.services = list(services)  # start order; stopped in reverse
        self.reaper = reaper
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.launched = clock()
        self.exit_code = 0
        self._main: asyncio.Task[None] | None = None
        self._stop_requested = False
        self._stop_at: float | None = None
        self._stop_deadline: float | None = None  # when the children must be gone (POGLY_STOP_TIMEOUT − margin)
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._all_begun: asyncio.Future[None] | None = None  # set by _begin_shutdown: every stop signal sent
        self._stops: list[asyncio.Future[None]] = []
        self._service_tasks: list[asyncio.Task[None]] = []
        self._shutdown_start = 0.0

    # -- signals ---------------------------------------------------------------------------
    def request_stop(self, signum: int, at: float | None = None) -> None:
        """Signal handler: the first cancels everything and begins the shutdown; the second forces it."""
        name = signal.Signals(signum).name
        # The intent is recorded before the log line: a stop must never depend on a log write.
        if not self._stop_requested:
            self._stop_requested = True
            self._stop_at = self.clock() if at is None else at  # POGLY_STOP_TIMEOUT counts from the signal
            try:
                log.info("signal.received", signal=name, action="stopping")
            finally:  # the intent is recorded: a failed log write cannot keep the stop from happening
                self._stop()  # Caddy's stop signal leaves in this very step
        elif not self._force.is_set():
            self._force.set()
            log.warning("signal.received", signal=name, action="second signal: skipping remaining graces, SIGKILL now")

    # -- the run ---------------------------------------------------------------------------
    async def run(self, *, first: Callable[[], None] | None = None, jobs: Mapping[str, Job] | None = None,
                  ready_when: Sequence[asyncio.Event] = (),
                  ready_fields: Callable[[], dict[str, Any]] = dict) -> int:
        """Everything until stopped; returns the exit code.

        ``first`` runs before any service starts (a ``Fatal`` there stops
        everything); ``jobs`` run beside the services, in order, after them;
        "ready" is announced once every service and every ``ready_when`` event is.
        """
        self._main = asyncio.create_task(self._everything(first, dict(jobs or {}), ready_when, ready_fields),
                                         name="main")
        if self._stop_requested:  # a signal that arrived before the event loop ran: start nothing
            self._stop()
        await self._stopping.wait()  # a stop request, or main ended on its own (a fatal error)
        self._stop()  # no-op after a signal; after a fatal error the same stop
        await self._shutdown()  # concurrently with main's cancellation: exit as soon as children are gone
        await self._await_main()  # its short-lived helpers are killed and reaped by now
        if os.getpid() == 1 or is_subreaper():  # whoever adopted orphans sweeps them (never a test's pytest)
            self._kill_stragglers()
        return self.exit_code

    def _stop(self) -> None:
        """The stop: cancel the task group (nothing restarts after this) and send the first stop signal.

        The first child's stop signal leaves here, synchronously: from a
        signal that is the handler's own step, ahead of the clean-up of every
        cancelled task.  Before ``run`` has begun there is nothing to stop yet;
        ``run`` calls this again once it has.
        """
        if self._main is not None:
            self._main.cancel()
            # The task group passes the cancellation on only when main next wakes, a step from now.  A
            # service loop whose wake-up is already queued (a child that just exited or became ready, a
            # restart pause that just ended) would take one more step before that: launch a child nobody
            # stops, or write "backoff"/"ready" over "stopping".  Cancelled here, that step raises instead.
            for task in self._service_tasks:
                task.cancel()
            self._begin_shutdown()
        self._stopping.set()

    async def _everything(self, first: Callable[[], None] | None, jobs: dict[str, Job],
                          ready_when: Sequence[asyncio.Event], ready_fields: Callable[[], dict[str, Any]]) -> None:
        try:
            if first is not None:
                first()
            async with asyncio.TaskGroup() as tasks:
                for service in self.services:
                    self._service_tasks.append(tasks.create_task(service.supervise(), name=service.name))
                tasks.create_task(self._announce_ready(ready_when, ready_fields), name="ready")
                for name, job in jobs.items():
                    tasks.create_task(job(), name=name)
        except* Fatal as group:
            self._fail(group.exceptions[0])  # type: ignore[arg-type]
        except* Exception as group:
            for exc in group.exceptions:
                log.error("entrypoint.internal_error", error=repr(exc), exc_info=exc)
            self.exit_code = EXIT_SOFTWARE
        self._stopping.set()

    def _fail(self, fatal: Fatal) -> None:
        if self.exit_code == 0:
            self.exit_code = fatal.exit_code
        log.error(fatal.event, message=fatal.message, exit_code=fatal.exit_code, **fatal.fields)

    async def _announce_ready(self, ready_when: Sequence[asyncio.Event],
                              ready_fields: Callable[[], dict[str, Any]]) -> None:
        for service in self.services:
            await service.first_ready.wait()
        for event in ready_when:
            await event.wait()
        elapsed = self.clock() - self.launched
        self.status.ready_seconds = round(elapsed, 3)
        reasons = self.status.not_ready()
        if reasons:  # everything started, yet /readyz says 503 (a refused module update): never log "ready" then
            log.warning("entrypoint.up_not_ready", **ready_fields(), ready_ms=round(elapsed * 1000, 1),
                        not_ready=reasons, message="started, but not ready: " + "; ".join(reasons))
            return
        log.info("entrypoint.ready", **ready_fields(), ready_ms=round(elapsed * 1000, 1))

    # -- shutdown --------------------------------------------------------------------------
    def _begin_shutdown(self) -> None:
        """Reverse start order, each child within its grace, all within the stop budget; once.

        The order is what keeps requests whole: Caddy drains what it is serving
        before SpacetimeDB stops answering it.  A child that has said it serves
        nothing any more (``Service.mark_done_serving``: Caddy logs "shutdown
        complete" once every server has drained, ~8 ms before its process is
        gone) lets the next stop begin at once, so the two exits overlap and
        a stop costs about the longer of them instead of their sum (issue 15).

        Each stop signal leaves synchronously: the first in the caller's step,
        each next one inside the callback that relays the previous child's
        last line, or when the previous child's exit is seen.  No task hop sits
        in between: under load each hop was a wake-up the scheduler could
        delay by milliseconds.  ``_shutdown`` waits for what this began.
        """
        if self._all_begun is not None:
            return
        self.status.shutting_down = True  # /readyz answers 503 from here on
        start = self._shutdown_start = self.clock() if self._stop_at is None else min(self._stop_at, self.clock())
        deadline = self._stop_deadline = start + self.stop_timeout - STOP_MARGIN
        pending = list(reversed(self.services))
        stops = self._stops
        all_begun = self._all_begun = asyncio.get_running_loop().create_future()

        def begin_next() -> None:
            if not pending:
                if not all_begun.done():
                    all_begun.set_result(None)
                return
            service = pending.pop(0)
            remaining = max(deadline - self.clock(), 0.0)
            try:
                stop = service.begin_stop(min(service.grace(), remaining), self._force)
            except Exception as exc:  # raised in a callback it would be lost: kept as a failed stop for _shutdown
                failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                stops.append(failed)
                begin_next()  # the next child is stopped all the same (SpacetimeDB's flush must not depend on it)
                return
            stops.append(stop)
            released = False

            def release(*_: object) -> None:  # whichever comes first: done serving, or gone
                nonlocal released
                if not released:
                    released = True
                    begin_next()

            stop.add_done_callback(release)
            service.call_when_done_serving(release)

        begin_next()

    async def _shutdown(self) -> None:
        """Wait for the stop ``_begin_shutdown`` began: every child gone, or killed at its grace."""
        self._begin_shutdown()
        assert self._all_begun is not None
        await self._all_begun
        if self._stops:
            await asyncio.wait(self._stops)  # every stop that began runs to its end, whatever failed meanwhile
        for stop in self._stops:
            stop.result()  # the first failure (one that could not begin, or a stop's own) is raised
        self.status.stop_seconds = round(self.clock() - self._shutdown_start, 3)

    async def _await_main(self) -> None:
        """Let every cancelled task finish its cleanup, but never past the stop budget.

        A job that swallows its cancellation (a bug, or a library that drops
        it) would otherwise keep PID 1 alive after both children are gone, and
        an orchestrator would wait out its own grace and SIGKILL us.  It is
        named in the log so the bug can be found; we exit anyway.
        """
        assert self._main is not None
        left = max((self._stop_deadline or self.clock()) - self.clock(), 0.0) + STOP_MARGIN / 2
        done, _ = await asyncio.wait({self._main}, timeout=left)
        if not done:
            me = asyncio.current_task()
            stuck = sorted(t.get_name() for t in asyncio.all_tasks() if not t.done() and t is not me)
            log.error("entrypoint.stop_stuck", tasks=stuck, waited_s=round(left, 2),
                      message="these tasks did not end after the stop cancelled them (a bug); exiting anyway")
            if self.exit_code == 0:
                self.exit_code = EXIT_SOFTWARE

    def _kill_stragglers(self) -> None:
        """Whatever we adopted and still runs dies with us; say so first.

        As PID 1 that is every process in the namespace.  As a subreaper
        (``make run``, ``docker run --init``) it is our descendants: orphans
        re-parented to us, e.g. a helper SpacetimeDB started in a session of its
        own, which would otherwise outlive us under the host's init.
        """
        me = os.getpid()
        procs: dict[int, tuple[int, str, bool]] = {}  # pid -> (ppid, comm, zombie)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                comm = (entry / "comm").read_text().strip()
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                procs[int(entry.name)] = (int(fields[1]), comm, fields[0] == "Z")
            except (OSError, IndexError, ValueError):
                continue
        if me == 1:
            doomed = set(procs)
        else:
            doomed, frontier = set(), {me}
            while frontier:
                frontier = {pid for pid, (ppid, _, _) in procs.items() if ppid in frontier} - doomed
                doomed |= frontier
        for pid in sorted(doomed):
            _, comm, zombie = procs[pid]
            if zombie:
                continue
            log.warning("entrypoint.straggler_killed", pid=pid, comm=comm)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reaper.reap()
