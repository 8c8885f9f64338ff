"""SpacetimeDB as a supervised child: SIGINT to stop, ``/v1/ping`` for readiness, a held lock waited out.

What differs from the generic ``Service`` loop:

* an exit right after a lock error is ``LockHeld(pid)``, not a death: another
  live process holds the data directory (``spacetime.pid`` is an flock).  It is
  waited out with pauses from the one backoff until ``POGLY_LOCK_WAIT``, and
  never counts towards the crash-loop verdict.  A holder that is our own
  leftover (an earlier run's server, re-parented to us) is stopped with SIGINT
  first.  The lock file itself is never touched: deleting it would let two
  servers write one data directory.
* readiness is ``GET /v1/ping`` answering 200, polled sooner once the server
  logs that it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint import logs
from entrypoint.config import HostPort
from entrypoint.errors import EXIT_UNAVAILABLE, Fatal
from entrypoint.spacetimedb import server
from entrypoint.supervision import status as state
from entrypoint.supervision.process import ChildHandle, ChildSpec
from entrypoint.supervision.restart import delays
from entrypoint.supervision.service import Died, Outcome, Service

log = logs.get("supervisor")

Ping = Callable[[HostPort, float], Awaitable[bool]]

#: Pauses while another process holds the lock: 0.2 s doubling to 5 s, up to +25 %.
LOCK_FIRST_S = 0.2
LOCK_CAP_S = 5.0
LOCK_JITTER = 0.25
#: Pings before the server says it listens: 5 ms doubling to 200 ms (it is up within ~250 ms).
ANSWER_TIMEOUT = 2.0  # a ready server answers /v1/ping in milliseconds; /readyz's probe timeout is 3 s
ANSWER_CACHE = 2.0  # at most one such ping per this many seconds, however many ask
PING_FIRST_S = 0.005
PING_CAP_S = 0.2


@dataclass(frozen=True)
class LockHeld(Outcome):
    """SpacetimeDB refused to start: live process ``holder`` holds ``spacetime.pid`` (0: unknown)."""

    holder: int


@dataclass
class _LockWait:
    """One wait for the lock: its deadline and pauses, for as long as no run becomes ready."""

    deadline: float
    pauses: Iterator[float]
    generation: int


class SpacetimeService(Service):
    """SpacetimeDB: SIGINT to stop (no SIGTERM handler upstream), ping for readiness."""

    name = "spacetimedb"
    stop_signal = signal.SIGINT

    def __init__(self, *args: Any, ping: Ping = server.ping, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ping = ping
        self.lock_holder: int | None = None
        self._listening = asyncio.Event()
        self._lock_wait: _LockWait | None = None
        self._answer_check: asyncio.Task[None] | None = None
        self._answered_at = float("-inf")

    async def prepare(self) -> None:
        server.check_keys(self.settings.config_dir)

    async def check_answering(self) -> None:
        """Asked by ``/readyz``: does the ready server still answer ``/v1/ping``?

        A SIGSTOPped or hung SpacetimeDB keeps its PID and its port (the kernel
        accepts connections for it), so nothing else notices.  Checked only when
        a probe asks (no idle wake-ups), at most once per ``ANSWER_CACHE`` seconds
        and shared by concurrent askers, so a flood of public ``/readyz`` costs one
        ping.
        """
        if self.info.state != state.READY:
            self.status.unanswered.pop(self.name, None)
            return
        if self._answer_check is None:
            if self.clock() - self._answered_at < ANSWER_CACHE:
                return
            self._answer_check = asyncio.ensure_future(self._check_answer())
        await asyncio.shield(self._answer_check)

    async def _check_answer(self) -> None:
        try:
            answered = await self.ping(self.settings.spacetime_addr, ANSWER_TIMEOUT)
            was = self.status.unanswered.get(self.name)
            if answered:
                self.status.unanswered.pop(self.name, None)
                if was is not None:
                    log.info("spacetime.answering_again")
            elif was is None and self.info.state == state.READY:
                why = f"not answering /v1/ping within {ANSWER_TIMEOUT:g} s"
                self.status.unanswered[self.name] = why
                log.warning("spacetime.not_answering", pid=self.info.pid, reason=why,
                            action="not ready until it answers again (a frozen or overloaded server)")
        finally:
            self._answered_at = self.clock()
            self._answer_check = None

    def spec(self) -> ChildSpec:
        self._listening.clear()
        self.lock_holder = None
        return ChildSpec(self.name, server.command(self.settings), dict(os.environ), signal.SIGINT, self.grace())

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        text = str(fields.get("message", ""))
        if server.is_listening_line(text):
            self._listening.set()
            return
        holder = server.parse_lock_error(text)
        if holder is not None:
            self.lock_holder = holder

    async def wait_ready(self, child: ChildHandle) -> None:
        for pause in delays(PING_FIRST_S, PING_CAP_S):
            if await self.ping(self.settings.spacetime_addr, 1.0):
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._listening.wait()

    def grace(self) -> float:
        return max(self.settings.stop_timeout - 1.0, 1.0)

    def read_exit(self, code: int) -> Outcome:
        """An exit that followed a lock error is a held lock, not a crash."""
        return LockHeld(self.lock_holder) if self.lock_holder is not None else Died(code)

    async def pause_after(self, outcome: Outcome) -> float:
        if isinstance(outcome, LockHeld):
            return await self._wait_for_lock(outcome.holder)
        return await super().pause_after(outcome)

    async def _wait_for_lock(self, holder: int) -> float:
        """The pause before the next try while ``holder`` keeps the lock; ``Fatal`` past POGLY_LOCK_WAIT."""
        wait = self._lock_wait
        if wait is None or wait.generation != self.generation:  # a new wait since the last ready run
            wait = self._lock_wait = _LockWait(self.launched_at + self.settings.lock_wait,
                                               delays(LOCK_FIRST_S, LOCK_CAP_S, jitter=LOCK_JITTER), self.generation)
        self._record_exit(f"lock held by pid {holder}")
        if not await self._stop_leftover(holder):
            log.warning("spacetime.lock_held", holder_pid=holder,
                        waited_s=round(self.settings.lock_wait - (wait.deadline - self.clock()), 1),
                        wait_limit_s=self.settings.lock_wait,
                        hint="another SpacetimeDB holds the data directory; waiting for it to exit")
        pause = next(wait.pauses)
        if self.clock() + pause >= wait.deadline:
            raise Fatal(
                EXIT_UNAVAILABLE,
                f"SpacetimeDB could not lock {self.settings.data_dir}: spacetime.pid is held by live "
                f"process {holder or 'unknown'} for over {self.settings.lock_wait:g} s (POGLY_LOCK_WAIT). "
                "This usually means an old pod or container is still running with the same volume: "
                "stop it, and use `strategy: Recreate` for the Deployment. Do NOT delete spacetime.pid: "
                "it is an flock, and deleting it lets two servers write one data directory.",
                event="spacetime.lock_timeout", holder_pid=holder,
            )
        return pause

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
