"""Run the SpacetimeDB stand-in (tests/standin) from tests: start, wait for readiness, stop.

Readiness is the server's own "listening" line, read from its output by a
thread, with a deadline: no sleeps.  Every process started here is stopped
by its PID with SIGINT (graceful, like the supervisor does), SIGKILL only
after a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from entrypoint.config import HostPort, parse_host_port
from entrypoint.spacetimedb.server import is_listening_line

STANDIN = Path(__file__).parent / "standin" / "bin" / "spacetime"
START_DEADLINE = 30.0
STOP_TIMEOUT = 15.0


def listening_addr(line: str) -> HostPort | None:
    """The address from SpacetimeDB's listening line: the real port when the stand-in was started on port 0."""
    return parse_host_port(line.rsplit(" ", 1)[-1]) if is_listening_line(line) else None


class StandIn:
    """One ``spacetime start`` of the stand-in on the given directories."""

    def __init__(self, data_dir: Path, key_dir: Path, *, version: str = "1.7.0", listen: str = "127.0.0.1:0",
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.key_dir = key_dir
        self.listen = listen
        self.env = {**os.environ, "STANDIN_VERSION": version, **(env or {})}
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._addr: HostPort | None = None
        self._changed = threading.Condition()
        self._eof = False

    @property
    def addr(self) -> HostPort:
        if self._addr is None:
            raise RuntimeError("stand-in not started")
        return self._addr

    def start(self, deadline: float = START_DEADLINE) -> HostPort:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.key_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(STANDIN), "start", "--data-dir", str(self.data_dir), "--jwt-key-dir", str(self.key_dir),
             "--listen-addr", self.listen],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=self.env, start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True, name=f"standin-{self.proc.pid}").start()
        end = time.monotonic() + deadline
        with self._changed:
            while self._addr is None:
                remaining = end - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._changed.wait(remaining)
        if self._addr is None:
            self.stop()
            raise RuntimeError("stand-in did not report listening:\n" + "\n".join(self.lines))
        return self._addr

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            with self._changed:
                self.lines.append(line)
                if self._addr is None:
                    self._addr = listening_addr(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGINT (graceful, syncs data), SIGKILL if it does not exit in time; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with self._changed:
            end = time.monotonic() + 5.0
            while not self._eof and time.monotonic() < end:
                self._changed.wait(end - time.monotonic())
        return proc.returncode

    def __enter__(self) -> StandIn:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 30.0,
        clean_env: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a stand-in CLI subcommand (``sql``, ``logs``, …) and capture its output.

    ``env`` is added to ours, or used alone with ``clean_env`` (to drop a variable such as
    ``XDG_CONFIG_HOME``).
    """
    full = dict(env or {}) if clean_env else {**os.environ, **(env or {})}
    return subprocess.run([str(STANDIN), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=full)
