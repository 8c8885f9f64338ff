"""Children: spawn with a clean slate, relay their output, reap them, stop them.

Why ``posix_spawn`` and our own reaper instead of ``asyncio.subprocess``:

* As PID 1 we must ``waitpid(-1)`` for orphans, and asyncio's child watchers
  each wait on one PID; two waiters race and one loses an exit status.  Here a
  single SIGCHLD handler reaps *everything* and hands our children's statuses
  to their futures (``Reaper``), so an orphan is never confused with a child.
* ``posix_spawn`` resets every signal to its default disposition and clears the
  signal mask in the child before ``exec`` (``setsigdef``/``setsigmask``), and
  puts it in its own process group (``setpgroup``).  Python's handlers and any
  blocked signals therefore never leak into SpacetimeDB or Caddy, and there is
  no fork-to-exec window in which a stop signal could be swallowed (the
  supervisord race).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from entrypoint import logs
from entrypoint.supervision.spawn import spawn

READ_CHUNK = 65536
DRAIN_TIMEOUT = 1.0

LineSink = Callable[[str, bytes, bool], None]  # (stream, raw line, truncated)


class Reaper:
    """The one and only caller of ``waitpid`` in this process.

    Children are registered synchronously right after ``posix_spawn`` returns,
    in the same loop callback, and SIGCHLD is handled as a loop callback too, so
    a child can never be reaped before it is registered.
    """

    def __init__(self, expected: tuple[int, ...] = ()) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._expected = expected  # children spawned before the event loop existed
        self._early: dict[int, asyncio.Future[int]] = {}
        self.orphans_reaped = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for pid in self._expected:  # registered first, so the reap below cannot mistake them for orphans
            self._early[pid] = self._waiters[pid] = loop.create_future()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # anything that died before the handler existed

    def uninstall(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_signal_handler(signal.SIGCHLD)
        self._loop = None

    def register(self, pid: int) -> asyncio.Future[int]:
        if pid in self._early:  # spawned before the loop: its future may already hold the exit status
            return self._early.pop(pid)
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._waiters[pid] = future
        return future

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            future = self._waiters.pop(pid, None)
            if future is None:
                self.orphans_reaped += 1
            elif not future.done():
                future.set_result(os.waitstatus_to_exitcode(status))


class LineFramer:
    """Splits a byte stream into lines with bounded memory.

    A line longer than ``max_line`` is cut there and the rest of it dropped
    (flagged as truncated), so a child printing a megabyte without a newline
    costs us ``max_line`` bytes, not a megabyte.
    """

    def __init__(self, sink: Callable[[bytes, bool], None], max_line: int = logs.MAX_LINE) -> None:
        self._sink = sink
        self._max = max_line
        self._pending = b""
        self._discarding = False

    def feed(self, data: bytes) -> None:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            start = end + 1
            if self._discarding:
                self._discarding = False
            elif len(line) > self._max:
                self._sink(line[: self._max], True)
            else:
                self._sink(line, False)
        rest = data[start:]
        if self._discarding:
            return
        if len(rest) > self._max:
            self._sink(rest[: self._max], True)
            self._discarding = True
        else:
            self._pending = rest

    def close(self) -> None:
        if self._pending and not self._discarding:
            self._sink(self._pending, False)
        self._pending = b""
        self._discarding = False


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    stop_signal: int = signal.SIGTERM
    grace: float = 10.0
    cwd: str | None = None


Spawner = Callable[[list[str], dict[str, str], str | None], tuple[int, int, int]]


class ChildHandle(Protocol):
    """What a ``Service`` needs of one run of its child; ``Child`` is the real one.

    The seam for in-process tests (honcho's injected process constructor): a
    scripted fake says when it is ready, exits with a chosen code and answers
    stop signals as the test decides, without a process or a signal.
    """

    pid: int | None

    def start(self) -> None:
        """Begin the run; raises ``OSError`` when the program cannot be executed."""

    @property
    def running(self) -> bool:
        """Started and not yet seen to exit."""

    async def wait(self) -> int:
        """The exit code once it has exited (``-N`` for signal N), output relayed."""

    def send_stop_signal(self) -> None:
        """The stop signal now, in the caller's step; once per run (``stop`` then only waits)."""

    async def stop(self, grace: float | None = None, force: asyncio.Event | None = None) -> tuple[int, bool]:
        """Stop signal (unless sent), up to ``grace`` (or until ``force``), then SIGKILL; ``(code, killed)``."""


#: Makes one run of a child from its spec and the sink for its output lines.
Launcher = Callable[[ChildSpec, LineSink], ChildHandle]


@dataclass
class Child:
    """One run of one child: its PID, its output, its exit."""

    spec: ChildSpec
    reaper: Reaper
    sink: LineSink
    spawner: Spawner = spawn
    pid: int | None = None
    returncode: int | None = None
    _status: asyncio.Future[int] | None = None
    _eof: list[asyncio.Event] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _finisher: asyncio.Future[None] | None = None
    _stop_sent: bool = False

    def start(self) -> None:
        """Spawn synchronously; the reaper registration happens in the same step."""
        loop = asyncio.get_running_loop()
        pid, out_fd, err_fd = self.spawner(self.spec.argv, self.spec.env, self.spec.cwd)
        self.pid = pid
        self._status = self.reaper.register(pid)
        for fd, stream in ((out_fd, "stdout"), (err_fd, "stderr")):
            eof = asyncio.Event()
            framer = LineFramer(lambda raw, trunc, s=stream: self.sink(s, raw, trunc))
            loop.add_reader(fd, self._on_readable, fd, framer, eof)
            self._eof.append(eof)
            self._fds.append(fd)
        self._finisher = asyncio.ensure_future(self._finish())

    def _on_readable(self, fd: int, framer: LineFramer, eof: asyncio.Event) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            framer.feed(data)
            return
        self._close_fd(fd, framer, eof)

    def _close_fd(self, fd: int, framer: LineFramer, eof: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        framer.close()
        with contextlib.suppress(OSError):
            os.close(fd)
        if fd in self._fds:
            self._fds.remove(fd)
        eof.set()

    async def _finish(self) -> None:
        assert self._status is not None
        code = await self._status
        # Everything the child wrote before it exited is relayed before anyone
        # hears about the exit; a grandchild holding the pipe open cannot stall us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                for eof in self._eof:
                    await eof.wait()
        for fd in list(self._fds):
            self._drain_and_close(fd)
        self._kill_leftovers()
        self.returncode = code
        self._done.set()

    def _drain_and_close(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        self._fds.remove(fd)

    def _kill_leftovers(self) -> None:
        """Grandchildren left in the group die with their leader (dumb-init #212)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.pid is not None and not self._done.is_set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def signal_group(self, sig: int) -> None:
        if self.pid is None or self._done.is_set():
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def send_stop_signal(self) -> None:
        """Stop signal (then SIGCONT) to the group, synchronously and once per run.

        Synchronous so the supervisor can chain one child's stop to another's
        last line in the same loop step (issue 15: every hop was a wake-up the
        scheduler could delay by milliseconds).
        """
        if self._stop_sent or not self.running:
            return
        self._stop_sent = True
        self.signal_group(self.spec.stop_signal)
        # A stopped (SIGSTOP, frozen) child would hold its stop signal pending until SIGKILL at the
        # grace, losing what SpacetimeDB flushes on SIGINT: wake it to handle it (s6-supervise sends
        # CONT after its down-signal too).  A running child ignores SIGCONT.
        self.signal_group(signal.SIGCONT)

    async def stop(self, grace: float | None = None, force: asyncio.Event | None = None) -> tuple[int, bool]:
        """The stop signal (unless ``send_stop_signal`` sent it), up to ``grace`` (or until ``force``), SIGKILL.

        Returns ``(returncode, killed)``.
        """
        if not self.running:
            return (self.returncode if self.returncode is not None else 0), False
        grace = self.spec.grace if grace is None else grace
        self.send_stop_signal()
        waiter = asyncio.ensure_future(self._done.wait())
        others: set[asyncio.Future[object]] = {waiter}
        forcer = None
        if force is not None:
            forcer = asyncio.ensure_future(force.wait())
            others.add(forcer)
        try:
            await asyncio.wait(others, timeout=max(grace, 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if forcer is not None:
                forcer.cancel()
        killed = False
        if not self._done.is_set():
            killed = True
            self.signal_group(signal.SIGKILL)
        await waiter
        assert self.returncode is not None
        return self.returncode, killed


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


def exit_status(code: int) -> int:
    """A child's return code as a shell would report it: ``128+N`` for signal N."""
    return 128 - code if code < 0 else code


async def run_capture(
    argv: list[str], env: dict[str, str], timeout: float, reaper: Reaper, limit: int = 1 << 20
) -> tuple[int, bytes, bytes]:
    """Run a short command to completion (``caddy validate``, ``oidc-check``) through our reaper.

    Past ``timeout`` the command is killed and ``TimeoutError`` raised: a hang
    is not an answer, and must not be read as one (a killed ``caddy validate``
    is not an invalid Caddyfile).
    """
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    sizes = {"stdout": 0, "stderr": 0}

    def sink(stream: str, raw: bytes, truncated: bool) -> None:
        if sizes[stream] < limit:
            chunks[stream].append(raw + b"\n")
            sizes[stream] += len(raw) + 1

    child = Child(ChildSpec(os.path.basename(argv[0]), argv, env, signal.SIGKILL, 0), reaper, sink)
    child.start()
    try:
        async with asyncio.timeout(timeout):
            code = await child.wait()
    except TimeoutError:
        await child.stop(0)
        raise
    except asyncio.CancelledError:
        # A shutdown must not leave it behind: kill it and see it gone (SIGKILL
        # cannot be ignored, so this wait is short) before letting the cancel through.
        child.signal_group(signal.SIGKILL)
        await child.wait()
        raise
    return code, b"".join(chunks["stdout"]), b"".join(chunks["stderr"])
