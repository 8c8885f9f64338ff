"""One init as PID 1 of its own PID namespace, watched from outside: output, readiness, writes, exit.

Every wait here has a deadline and every loop a bound; every process started is
tracked and, at the end, killed by killing its namespace's init (the kernel then
kills the rest of the namespace).  Only loopback addresses are ever contacted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import procfs

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.005  # readiness poll interval: each poll is one loopback HTTP request
INDEX_MARKER = b"pogly placeholder"  # tests.harness.base_env's index.html


class BenchError(RuntimeError):
    """A subject did not do what a scenario needs (never started, never ready, …): recorded, not fatal."""


# -- processes ---------------------------------------------------------------------------------

_LIVE: set[Boot] = set()


class Boot:
    """``unshare --pid --fork --mount-proc ARGV``: the subject is PID 1 inside, ``inner_pid`` outside.

    stdout and stderr (merged, unless ``split_stderr``) are drained by a thread into ``log_path`` as
    they come, so a chatty subject never blocks on a full pipe; ``markers`` are byte strings whose
    first appearance is time-stamped (``time.monotonic()``).
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str], log_path: Path, *,
                 markers: Sequence[bytes] = (), count: bytes | None = None, split_stderr: bool = False,
                 cwd: Path = REPO) -> None:
        self.log_path = log_path
        self.markers: dict[bytes, float | None] = dict.fromkeys(markers)
        self.count_pattern = count
        self.counted = 0  # occurrences of ``count`` in the output so far
        self._marker_event = threading.Condition()
        self.stderr_lines: list[tuple[float, bytes]] = []
        self.exit_at: float | None = None
        self.returncode: int | None = None
        self._exited = threading.Event()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.launched_wall = time.time()
        self.launched = time.monotonic()
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", *argv], env=env, cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if split_stderr else subprocess.STDOUT,
            start_new_session=True)  # a Ctrl-C at the terminal reaches the harness, which cleans up
        _LIVE.add(self)
        self._threads = [threading.Thread(target=self._drain, daemon=True),
                         threading.Thread(target=self._wait, daemon=True)]
        if split_stderr:
            self._threads.append(threading.Thread(target=self._drain_stderr, daemon=True))
        for thread in self._threads:
            thread.start()
        self._inner: int | None = None

    # output
    def _drain(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        longest = max((len(m) for m in self.markers), default=0)
        pattern = self.count_pattern
        count_tail = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            now = time.monotonic()
            self._log.write(chunk)
            if pattern:
                # The tail is one byte shorter than the pattern: nothing counted before is counted again.
                window = count_tail + chunk
                self.counted += window.count(pattern)
                count_tail = window[-(len(pattern) - 1):] if len(pattern) > 1 else b""
            if self.markers:
                window = tail + chunk
                found = [m for m, at in self.markers.items() if at is None and m in window]
                if found:
                    with self._marker_event:
                        for marker in found:
                            self.markers[marker] = now
                        self._marker_event.notify_all()
                tail = window[-longest:]
        self._log.close()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append((time.monotonic(), line))

    def _wait(self) -> None:
        code = self.proc.wait()
        self.exit_at = time.monotonic()
        self.returncode = code
        self._exited.set()

    def wait_marker(self, marker: bytes, timeout: float) -> float:
        """When ``marker`` first appeared in the output (monotonic), waiting at most ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._marker_event:
            while self.markers.get(marker) is None:
                left = deadline - time.monotonic()
                if left <= 0 or (self._exited.is_set() and not self._threads[0].is_alive()):
                    raise BenchError(f"no {marker!r} in the output within {timeout} s")
                self._marker_event.wait(min(left, 0.2))
            at = self.markers[marker]
        assert at is not None
        return at

    # the process
    @property
    def inner_pid(self) -> int:
        """PID 1 of the namespace, as seen from here."""
        if self._inner is None:
            deadline = time.monotonic() + 5
            while not (kids := procfs.children_of(self.proc.pid)):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise BenchError("unshare's child never appeared")
                time.sleep(0.001)
            self._inner = kids[0]
        return self._inner

    def alive(self) -> bool:
        return not self._exited.is_set()

    def signal(self, sig: int) -> None:
        os.kill(self.inner_pid, sig)

    def wait_exit(self, timeout: float) -> float | None:
        """Monotonic time the namespace was gone (unshare reaped), or None after ``timeout``."""
        return self.exit_at if self._exited.wait(timeout) else None

    def exit_code(self) -> int | None:
        """PID 1's exit status as a shell shows it (128+N for a signal)."""
        if self.returncode is None:
            return None
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    def kill(self) -> None:
        """SIGKILL the namespace's init: the kernel kills everything else in the namespace."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, BenchError):
                os.kill(self.inner_pid, signal.SIGKILL)
            if self.wait_exit(10) is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.wait_exit(10)
        for thread in self._threads:
            thread.join(10)
        _LIVE.discard(self)

    def __enter__(self) -> Boot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def kill_all() -> None:
    """Whatever is still running (the harness is failing or interrupted)."""
    for boot in list(_LIVE):
        boot.kill()


def namespace_pids(boot: Boot) -> list[int]:
    """PID 1 of the namespace and everything below it (PIDs as seen from here)."""
    inner = boot.inner_pid
    return [inner, *procfs.descendants(inner)]


def find_standin_server(boot: Boot) -> int | None:
    """The SpacetimeDB stand-in's server process (``spacetime start``) in the namespace."""
    for pid in namespace_pids(boot):
        argv = procfs.cmdline(pid)
        if any(a.endswith("fake_spacetime.py") for a in argv) and "start" in argv:
            return pid
    return None


# -- HTTP on loopback ----------------------------------------------------------------------------

def request(port: int, path: str, *, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 1.0, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request on a fresh connection, closed after (keep-alive would delay Caddy's graceful stop)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check(port: int, path: str, want: Callable[[int, bytes], bool]) -> bool:
    try:
        return want(*request(port, path, timeout=0.5))
    except (OSError, http.client.HTTPException):
        return False


def ready_checks(http_port: int, *, readyz: bool, module: str = "pogly") -> list[tuple[str, Callable[[], bool]]]:
    """"Ready", the same for every init, seen from outside through Caddy's port.

    Caddy serves the web root; it proxies ``/v1/ping`` to a SpacetimeDB that answers; the module
    is published (its ``identity`` answers 200); and, for pogly-entrypoint, ``/readyz`` is 200.
    """
    ok = lambda status, _body: status == 200  # noqa: E731
    checks = [
        ("web root", lambda: check(http_port, "/", lambda s, b: s == 200 and INDEX_MARKER in b)),
        ("/v1/ping", lambda: check(http_port, "/v1/ping", ok)),
        ("module published", lambda: check(http_port, f"/v1/database/{module}/identity", ok)),
    ]
    if readyz:
        checks.append(("/readyz", lambda: check(http_port, "/readyz", ok)))
    return checks


def wait_ready(boot: Boot, checks: list[tuple[str, Callable[[], bool]]], timeout: float) -> float:
    """Monotonic time at which every check had passed, each polled in turn until it passes.

    The conditions only become true during a start, so once one passes the next is polled.
    """
    deadline = time.monotonic() + timeout
    stage = 0
    last = time.monotonic()
    while stage < len(checks):
        if checks[stage][1]():
            last = time.monotonic()
            stage += 1
            continue
        if not boot.alive():
            raise BenchError(f"exited (code {boot.exit_code()}) before ready: {checks[stage][0]} never passed")
        if time.monotonic() > deadline:
            raise BenchError(f"not ready within {timeout} s: {checks[stage][0]} never passed")
        time.sleep(POLL_S)
    return last


# -- SpacetimeDB's own API, directly on its loopback address (the writer and the counting) ------

def token(config_dir: Path) -> str:
    """The publisher's token from ``cli.toml`` on the config volume (every init publishes with it)."""
    return tomllib.loads((config_dir / "cli.toml").read_text())["spacetimedb_token"]


def sql_values(port: int, bearer: str, statement: str, module: str = "pogly") -> list[list[Any]]:
    status, body = request(port, f"/v1/database/{module}/sql", method="POST", body=statement.encode(),
                        headers={"Authorization": f"Bearer {bearer}"}, timeout=30)
    if status != 200:
        raise BenchError(f"SQL {statement!r} answered {status}: {body[:300]!r}")
    return json.loads(body)[0]["rows"]


class Writer:
    """``threads`` clients calling the ``insert_item`` reducer in a loop; remembers every acknowledged value.

    The clients run in a process of their own (``bench/writer.py``), so they never hold the GIL
    the harness's exit-time thread needs.  Bounded: stops on ``stop()``, after ``max_seconds``, or
    once every client has failed for ``give_up_s`` in a row (the server is gone).
    """

    def __init__(self, port: int, bearer: str, *, threads: int = 4, max_seconds: float = 60.0,
                 give_up_s: float = 2.0, module: str = "pogly") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.writer", "--port", str(port), "--module", module,
             "--threads", str(threads), "--max-seconds", str(max_seconds), "--give-up", str(give_up_s)],
            cwd=REPO, env={**os.environ, "BENCH_WRITER_BEARER": bearer},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self._chunks: list[bytes] = []
        self._lines = 0
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Big reads and a newline count: as little of the GIL as possible."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            with self._lock:
                self._chunks.append(chunk)
                self._lines += chunk.count(b"\n")

    def count(self) -> int:
        with self._lock:
            return self._lines

    def wait_count(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                raise BenchError(f"writer: only {self.count()} acknowledged writes in {timeout} s")
            time.sleep(0.01)

    def stop(self) -> list[str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(10)
        if self._reader.is_alive():  # a short list would under-count the writes lost: say so instead
            raise BenchError("writer: its output was not read to the end within 10 s")
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        with self._lock:
            text = b"".join(self._chunks).decode()
        return [line for line in text.split("\n") if line]
