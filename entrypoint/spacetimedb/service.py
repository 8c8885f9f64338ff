"""SpacetimeDB as a supervised child: SIGINT to stop, ``/v1/ping`` for readiness, a held lock waited out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from entrypoint import logs
from entrypoint.errors import EXIT_UNAVAILABLE, Fatal
from entrypoint.supervision import status as state
from entrypoint.supervision.process import Child, ChildSpec
from entrypoint.supervision.service import ExitedBeforeReady, Service

Clock = Callable[[], float]
log = logs.get("supervisor")


class LockHeld(Exception):
    """SpacetimeDB refused to start: another live process holds ``spacetime.pid`` (an flock)."""

    def __init__(self, holder: int) -> None:
        super().__init__(f"lock held by pid {holder}")
        self.holder = holder



class SpacetimeService(Service):
    """SpacetimeDB: SIGINT to stop (no SIGTERM handler upstream), ping for readiness."""

    name = "spacetimedb"
    stop_signal = signal.SIGINT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listening = asyncio.Event()
        self.lock_holder: int | None = None

    async def prepare(self) -> None:
        from entrypoint.spacetimedb import server as spacetime

        spacetime.check_keys(self.settings.config_dir)

    def spec(self) -> ChildSpec:
        from entrypoint.spacetimedb import server as spacetime

        self._listening.clear()
        self.lock_holder = None
        return ChildSpec(self.name, spacetime.command(self.settings), dict(os.environ),
                         signal.SIGINT, self.grace())

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        from entrypoint.spacetimedb import server as spacetime

        text = str(fields["event"])
        if spacetime.is_listening_line(text):
            self._listening.set()
            return
        holder = spacetime.parse_lock_error(text)
        if holder is not None:
            self.lock_holder = holder

    async def wait_ready(self, child: Child) -> None:
        from entrypoint.spacetimedb import server as spacetime

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


